"""RSP framing, escaping and run-length decoding (rig/rsp.py)."""

from rig.transport.rsp import checksum, frame, hex_le, is_error, unescape


def test_frame_checksum_matches_gdb_examples() -> None:
    # gdb sends "$g#67" and "$?#3f"; the checksum is the byte sum modulo 256
    assert frame("g") == b"$g#67"
    assert frame("?") == b"$?#3f"
    assert checksum(b"vCont;s:p1.2") == sum(b"vCont;s:p1.2") % 256


def test_frame_escapes_special_bytes() -> None:
    body = frame("a$b#c}d*")[1:-3]
    assert b"$" not in body and b"#" not in body
    assert unescape(body) == b"a$b#c}d*"


def test_unescape_run_length() -> None:
    # "0* " is '0' repeated 32-29=3 more times
    assert unescape(b"0* ") == b"0000"
    assert unescape(b"ab*!c") == b"abbbbbc"  # "!" = 33: 4 more


def test_hex_le_and_errors() -> None:
    assert hex_le("8000c081ffffffff") == 0xFFFFFFFF81C00080
    assert is_error("E14") and not is_error("OK") and not is_error("E1")

"""RSP framing, escaping and run-length decoding (rig/rsp.py)."""

import socket

import pytest

from rig.transport.rsp import RspLink, checksum, frame, hex_le, is_error, unescape


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


def test_pipeline_acknowledges_each_reply_in_the_write() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert RspLink(a, acks=True).pipeline(["g", "?"]) == b"$g#67+$?#3f+"
        assert RspLink(a, acks=False).pipeline(["g", "?"]) == b"$g#67$?#3f"


def test_the_stop_reply_ack_leads_the_next_write() -> None:
    """A resume packet ends its write; the '+' for its stop reply goes out with the next."""
    rig_end, peer = socket.socketpair()
    with rig_end, peer:
        link = RspLink(rig_end, acks=True)
        peer.sendall(b"+$T05thread:p01.02;#00")
        assert link.exchange(frame("vCont;s:p1.2"), 1, owe_last=True) == ["T05thread:p01.02;"]
        assert peer.recv(100) == frame("vCont;s:p1.2")  # nothing after the resume packet
        peer.sendall(b"+$OK#9a")
        assert link.exchange(link.pipeline(["Hg1"]), 1) == ["OK"]
        assert peer.recv(100) == b"+" + frame("Hg1") + b"+"
        with pytest.raises(ValueError, match="resume packet must end the write"):
            link.exchange(link.pipeline(["vCont;s:p1.2"]), 1, owe_last=True)

"""Transport: where processes run and how the rig talks to them
(host, QEMU, console, GDB/MI, the RSP relay)."""

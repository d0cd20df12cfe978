"""cr3rig: boot a Linux guest under QEMU, drive it with GDB, single-step its entry code.

The package is organised one module per concept:

* :mod:`rig.host`      where processes run (only the local host so far)
* :mod:`rig.qemu`      the QEMU process, its private socket directory, QMP
* :mod:`rig.console`   the guest's serial console (pexpect)
* :mod:`rig.gdbmi`     a GDB/MI session (pygdbmi parser, token-matched replies)
* :mod:`rig.vcpu`      one vCPU as GDB sees it: registers, memory through its page tables
* :mod:`rig.symbols`   kernel symbols (vmlinux or /proc/kallsyms) and per-CPU addresses
* :mod:`rig.x86`       CR3 decoding and the page-table walker
* :mod:`rig.stepping`  breakpoint-then-single-step with per-instruction snapshots
* :mod:`rig.guest`     a booted guest: the pieces above wired together
* :mod:`rig.plugin`    the pytest plugin (options, fixtures, failure reports)
"""

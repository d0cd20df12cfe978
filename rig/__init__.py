"""cr3rig: boot a Linux guest under QEMU, drive it with GDB, single-step its entry code.

The package is grouped by layer, one module per concept:

* :mod:`rig.transport`    where processes run and how the rig talks to them: ``host``,
  ``qemu`` (process, private socket directory, QMP), ``console`` (pexpect), ``gdbmi``
  (GDB/MI, token-matched replies), ``gdbproxy`` (the relay the stepping loop borrows),
  ``rsp`` (GDB remote protocol framing)
* :mod:`rig.machine`      the machine model: ``vcpu``, ``x86`` (CR3, page walks),
  ``symbols`` (vmlinux/kallsyms, per-CPU addresses), ``disasm``
* :mod:`rig.supply`       kernel supply: ``kernel`` (resolve ``--kernel``), ``kernelbuild``
  (built on ``debsource``, ``kerneltree``, ``kconfig``, ``buildrun``), ``initramfs``, ``cache``,
  ``qemu`` (other QEMU versions)
* :mod:`rig.observe`      observation: ``stepping`` (snapshots, traces), ``checks``
* :mod:`rig.report`       reports: ``timeline`` (a trace as HTML/SVG), ``session``
  (results/index.html), ``provenance`` (also JUnit properties), ``hooks`` (for the plugin)
* :mod:`rig.pytestplugin` the pytest plugin (options, fixtures, failure reports)
* :mod:`rig.tools`        tools built on the rig (``mutants``, ``matrix``)
* :mod:`rig.guest`        a booted guest: the parts wired together; :mod:`rig.errors`
"""

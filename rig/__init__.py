"""cr3rig: boot a Linux guest under QEMU, drive it with GDB, single-step its entry code.

The package is grouped by layer, one module per concept; a layer imports only the
layers below it:

* :mod:`rig.errors`, :mod:`rig.protocol` the ground: the errors, and the markers the
  guest's user space prints on its console
* :mod:`rig.supply`       kernel supply: ``kernel`` (resolve ``--kernel``), ``kernelbuild``
  (built on ``debsource``, ``kerneltree``, ``kconfig``, ``buildrun``), ``initramfs``, ``cache``,
  ``images`` (what a kernel file is), ``qemu`` (other QEMU versions), ``qemuplugin``
* :mod:`rig.transport`    where processes run and how the rig talks to them: ``host`` (the
  interface), ``local`` and ``ssh`` (with ``sshconnect``, ``sshchannel``, ``sshsupervisor``),
  ``kvmprobe``, ``qemu`` (process, private socket directory, QMP), ``console`` (pexpect),
  ``gdbmi`` (GDB/MI), ``gdbproxy`` (the relay the stepping loop borrows), ``rsp`` (framing)
* :mod:`rig.machine`      the machine model: ``vcpu``, ``x86`` (CR3, the kernel half, page
  walks), ``walks`` (a running guest's tables), ``symbols``, ``sites`` and ``storepaths``
  (the kernel's CR3 switch sites), ``disasm``, and stepping: ``trace`` (snapshots,
  traces), ``stepper`` (the Stepper, ``step_over``), ``stops`` (stop conditions)
* :mod:`rig.guest`        a booted guest: ``guest`` composes ``runcontrol``, ``kernel``,
  ``userspace``; ``config`` checks the input
* :mod:`rig.observe`      observation and checks: ``findings``, ``checks``, ``transitions``,
  ``windows``/``explorer``/``exploration``, ``watching``, ``pluginwatch``, ``offwatch``,
  ``selftestwatch``, ``coverage``; :mod:`rig.diagnosis`
* :mod:`rig.report`       reports: ``lanes`` and ``timeline`` (a trace as HTML/SVG),
  ``session`` (results/index.html), ``provenance``, ``junit`` (the one JUnit reader),
  ``hooks`` (for the plugin)
* :mod:`rig.pytestplugin` the pytest plugins: ``plugin`` (options, guests, reports),
  ``caseoptions`` (the testcases' own options, typed skips), ``distributed``, ``failfast``
* :mod:`rig.tools`        tools built on the rig (``mutants``, ``matrix``, ``soak``, ``litmus``...)
"""

/*
 * compat-syscall-loop <cpu>: a 32-bit task that calls getpid() forever
 * through the SYSCALL instruction in compat mode, entering the kernel at
 * entry_SYSCALL_compat (MSR_CSTAR) and leaving through SYSRETL at
 * entry_SYSRETL_compat_unsafe_stack.
 *
 * The gate is the SYSCALL sequence of the 32-bit vDSO's __kernel_vsyscall
 * (arch/x86/entry/vdso/vdso32/system_call.S), written out so that it is used
 * whatever the vDSO's alternatives picked:
 *
 *     push %ecx; push %edx; push %ebp; mov %ecx, %ebp; syscall
 *
 * (%ecx is clobbered by SYSCALL, so its value travels in %ebp.)  The kernel
 * returns to the vDSO's int80_landing_pad, which pops %ebp, %edx, %ecx and
 * `ret`s to our caller.
 *
 * Real Intel CPUs raise #UD for SYSCALL in compat mode; AMD CPUs and QEMU's
 * TCG run it.  The workload refuses to start on a GenuineIntel CPU: Linux
 * does not write MSR_CSTAR there (wrmsrq_cstar() in
 * arch/x86/kernel/cpu/common.c), and QEMU 7.2's TCG with
 * `-cpu max,vendor=GenuineIntel` does not raise #UD but jumps to CSTAR = 0
 * in ring 0 on the user stack: a double fault and a kernel panic (seen on
 * reference-7.2).  `-cpu max` on TCG reports AuthenticAMD, where it works.
 */
static const char cr3rig_name[] = "compat-syscall-loop";

/* See above: on Intel this gate is #UD, or a kernel panic under TCG. */
static const char cr3rig_refused_vendor[] = "GenuineIntel";
static const char cr3rig_refused_hint[] =
	"compat-mode SYSCALL is #UD on Intel, and under QEMU TCG Linux leaves MSR_CSTAR 0 there (kernel panic); use -cpu max (AuthenticAMD under TCG)";

#include "compat32.h"

__asm__(".text\n"
	".type cr3rig_syscall_gate, @function\n"
	"cr3rig_syscall_gate:\n"
	"	pushl %ecx\n"
	"	pushl %edx\n"
	"	pushl %ebp\n"
	"	movl %ecx, %ebp\n"
	"	syscall\n"
	"	ud2\n" /* never reached: the kernel returns to the vDSO */
	".size cr3rig_syscall_gate, .-cr3rig_syscall_gate\n");

static long cr3rig_loop_syscall(long nr)
{
	long ret;

	__asm__ volatile("call cr3rig_syscall_gate"
			 : "=a"(ret)
			 : "a"(nr)
			 : "memory", "cc", "ecx", "edx");
	return ret;
}

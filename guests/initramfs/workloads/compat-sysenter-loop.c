/*
 * compat-sysenter-loop <cpu>: a 32-bit task that calls getpid() forever
 * through SYSENTER, entering the kernel at entry_SYSENTER_compat.
 *
 * The gate is the SYSENTER sequence of the 32-bit vDSO's __kernel_vsyscall
 * (arch/x86/entry/vdso/vdso32/system_call.S), written out here so that it is
 * used whatever the kernel's alternatives picked for the vDSO (AMD CPUs get
 * SYSCALL there, others SYSENTER):
 *
 *     push %ecx; push %edx; push %ebp; mov %esp, %ebp; sysenter
 *
 * SYSENTER saves no return address: the kernel returns (through SYSRETL,
 * entry_SYSRETL_compat_unsafe_stack, unless a signal or tracing forces IRET)
 * to the vDSO's int80_landing_pad, which pops %ebp, %edx, %ecx and `ret`s to
 * our caller, so the stack must look exactly like __kernel_vsyscall's.
 *
 * Real AMD CPUs raise #UD for SYSENTER in compat mode (it is legacy-mode
 * only there); Intel CPUs and QEMU's TCG (any vendor) run it.
 */
static const char cr3rig_name[] = "compat-sysenter-loop";

/* Runs on any vendor: the task dies with SIGILL where the gate is #UD. */
static const char cr3rig_refused_vendor[] = "";
static const char cr3rig_refused_hint[] =
	"";

#include "compat32.h"

__asm__(".text\n"
	".type cr3rig_sysenter_gate, @function\n"
	"cr3rig_sysenter_gate:\n"
	"	pushl %ecx\n"
	"	pushl %edx\n"
	"	pushl %ebp\n"
	"	movl %esp, %ebp\n"
	"	sysenter\n"
	"	ud2\n" /* never reached: the kernel returns to the vDSO */
	".size cr3rig_sysenter_gate, .-cr3rig_sysenter_gate\n");

static long cr3rig_loop_syscall(long nr)
{
	long ret;

	__asm__ volatile("call cr3rig_sysenter_gate"
			 : "=a"(ret)
			 : "a"(nr)
			 : "memory", "cc", "ecx", "edx");
	return ret;
}

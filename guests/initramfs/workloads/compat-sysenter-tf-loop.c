/*
 * compat-sysenter-tf-loop <cpu>: a 32-bit task that calls getpid() forever
 * through SYSENTER with EFLAGS.TF set, so that every system call raises a
 * #DB in kernel mode on the user CR3 and returns through paranoid_exit's
 * PARANOID_RESTORE_CR3 write of the user CR3.
 *
 * SYSENTER does not clear TF (tools/testing/selftests/x86/single_step_syscall.c
 * has the story).  The single-step trap therefore fires at CPL 0 at the very
 * start of entry_SYSENTER_compat, before its SWAPGS / SWITCH_TO_KERNEL_CR3:
 * the #DB (an IST, "paranoid" exception) goes through paranoid_entry, which
 * switches to the kernel CR3 and saves the user one, exc_debug_kernel
 * recognises the SYSENTER single-step (is_sysenter_singlestep) and ignores
 * it, and paranoid_exit writes the saved user CR3 back.  The kernel keeps
 * single-stepping its entry code (more #DBs, some on the kernel CR3) until
 * entry_SYSENTER_compat clears TF with POPFQ; the TF of the saved user flags
 * survives, so the system call returns through IRET (not SYSRETL) to the
 * vDSO's int80_landing_pad with TF set, and the first user instruction
 * there traps: one SIGTRAP per system call.  Our SIGTRAP handler clears TF
 * in the signal frame so the rest of the return path runs normally.
 *
 * Each loop iteration checks that getpid() returned the pid (compat32.h,
 * exit 3) and that exactly one SIGTRAP arrived, from a single-step with TF
 * set (exit 3 with a message otherwise): no SIGTRAP would mean TF was lost
 * on the way through the kernel, so the iteration did not exercise the path.
 *
 * The gate is compat-sysenter-loop's copy of the vDSO's __kernel_vsyscall
 * with PUSHFL; ORL $TF; POPFL just before SYSENTER (the stack pointer is
 * back to %ebp when SYSENTER runs).  Real AMD CPUs raise #UD for SYSENTER
 * in compat mode; Intel CPUs and QEMU's TCG (any vendor) run it.
 */
static const char cr3rig_name[] = "compat-sysenter-tf-loop";

/* Runs on any vendor: the task dies with SIGILL where the gate is #UD. */
static const char cr3rig_refused_vendor[] = "";
static const char cr3rig_refused_hint[] = "";

#define CR3RIG_SETUP cr3rig_install_sigtrap
#include "compat32.h"

#define NR32_rt_sigaction 174
#define SIGTRAP 5
#define SA_SIGINFO 0x00000004UL
#define X86_EFLAGS_TF 0x00000100UL

/* struct compat_sigaction (include/linux/compat.h), the i386 rt_sigaction layout. */
struct cr3rig_sigaction32 {
	unsigned long handler;
	unsigned long flags;
	unsigned long restorer; /* none: the kernel returns through the vDSO's __kernel_rt_sigreturn */
	unsigned long mask[2];
};

/* struct ucontext_ia32 (arch/x86/include/asm/ia32.h) up to sigcontext_32.flags. */
struct cr3rig_ucontext32 {
	unsigned long uc_flags, uc_link;
	unsigned long ss_sp, ss_flags, ss_size;
	unsigned short gs, gsh, fs, fsh, es, esh, ds, dsh;
	unsigned long di, si, bp, sp, bx, dx, cx, ax, trapno, err, ip;
	unsigned short cs, csh;
	unsigned long flags;
};
_Static_assert(__builtin_offsetof(struct cr3rig_ucontext32, flags) == 20 + 64,
	       "sigcontext_32.flags is at offset 64 of uc_mcontext, which is at 20");

/* SIGTRAPs taken (with TF set at the trap), and those that had TF clear. */
static volatile unsigned long cr3rig_traps, cr3rig_traps_without_tf;

static long int80_4(long nr, long a, long b, long c, long d)
{
	long ret;

	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d)
			 : "memory", "cc");
	return ret;
}

/* Count the single-step trap and stop stepping: clear TF in the interrupted context. */
static void cr3rig_sigtrap(int sig, void *info, void *uc_void)
{
	struct cr3rig_ucontext32 *uc = uc_void;

	(void)sig;
	(void)info;
	if (uc->flags & X86_EFLAGS_TF)
		cr3rig_traps++;
	else
		cr3rig_traps_without_tf++;
	uc->flags &= ~X86_EFLAGS_TF;
}

static void cr3rig_install_sigtrap(void)
{
	struct cr3rig_sigaction32 act = {
		.handler = (unsigned long)cr3rig_sigtrap,
		.flags = SA_SIGINFO,
	};
	long ret = int80_4(NR32_rt_sigaction, SIGTRAP, (long)&act, 0, sizeof(act.mask));

	if (ret != 0)
		cr3rig_die("rt_sigaction(SIGTRAP) failed", "");
}

__asm__(".text\n"
	".type cr3rig_sysenter_tf_gate, @function\n"
	"cr3rig_sysenter_tf_gate:\n"
	"	pushl %ecx\n"
	"	pushl %edx\n"
	"	pushl %ebp\n"
	"	movl %esp, %ebp\n"
	"	pushfl\n"
	"	orl $0x100, (%esp)\n" /* X86_EFLAGS_TF */
	"	popfl\n"  /* TF traps after the next instruction: SYSENTER, at CPL 0 */
	"	sysenter\n"
	"	ud2\n" /* never reached: the kernel returns to the vDSO */
	".size cr3rig_sysenter_tf_gate, .-cr3rig_sysenter_tf_gate\n");

static long cr3rig_loop_syscall(long nr)
{
	unsigned long before = cr3rig_traps;
	long ret;

	__asm__ volatile("call cr3rig_sysenter_tf_gate"
			 : "=a"(ret)
			 : "a"(nr)
			 : "memory", "cc", "ecx", "edx");
	if (cr3rig_traps_without_tf != 0) {
		cr3rig_puts(2, cr3rig_name);
		cr3rig_puts(2, ": SIGTRAP without TF set in the trapped context\n");
		cr3rig_exit(3);
	}
	if (cr3rig_traps != before + 1) {
		cr3rig_puts(2, cr3rig_name);
		cr3rig_puts(2, cr3rig_traps == before
				       ? ": no SIGTRAP after SYSENTER with TF set (TF lost in the kernel)\n"
				       : ": more than one SIGTRAP after one SYSENTER with TF set\n");
		cr3rig_exit(3);
	}
	return ret;
}

/*
 * bad-iret-loop <cpu>: pin to <cpu>, then make the kernel's IRET to user
 * mode fault, forever.
 *
 * Each iteration sends itself SIGUSR1.  The SIGUSR1 handler writes a bad SS
 * selector into its signal frame: the user code selector (a code segment can
 * never be loaded into SS).  The frame has UC_STRICT_RESTORE_SS set, so
 * rt_sigreturn restores that SS as it is (arch/x86/kernel/signal_64.c), and
 * a frame with SS != __USER_DS cannot use SYSRET: the kernel returns through
 * swapgs_restore_regs_and_return_to_usermode, already on the user CR3 and
 * user GS, and its IRETQ raises #GP in kernel mode.  error_entry sees the
 * fault at native_irq_return_iret and takes .Lerror_bad_iret, which switches
 * to the kernel CR3 a second time (error_entry+0x145 on reference-7.2);
 * fixup_bad_iret then makes it look like a #GP from user mode at the
 * interrupted user instruction, and the kernel delivers SIGSEGV (SIGBUS for
 * a not-present SS, #SS).
 *
 * The SIGSEGV/SIGBUS handler checks that the faulting frame carries our bad
 * SS (anything else is a real crash: it restores the default action and
 * returns, so the fault repeats and kills us), puts the good SS back and
 * returns; the loop goes on with the next kill().
 */
#include "workload.h"

#include <signal.h>
#include <stdint.h>
#include <ucontext.h>

/* uc_flags bit: restore SS exactly (asm/ucontext.h). */
#ifndef UC_STRICT_RESTORE_SS
#define UC_STRICT_RESTORE_SS 0x4
#endif

/*
 * gregs[REG_CSGSFS] packs cs, gs, fs and ss (the former __pad0, valid with
 * UC_SIGCONTEXT_SS) as four 16-bit fields, ss in bits 48..63.
 */
#define SS_SHIFT 48

static uint16_t good_ss, bad_ss;
static volatile sig_atomic_t faults;

static uint16_t frame_ss(const ucontext_t *uc)
{
	return (uint16_t)((uint64_t)uc->uc_mcontext.gregs[REG_CSGSFS] >> SS_SHIFT);
}

static void set_frame_ss(ucontext_t *uc, uint16_t ss)
{
	uint64_t v = (uint64_t)uc->uc_mcontext.gregs[REG_CSGSFS];

	v = (v & ~(0xffffULL << SS_SHIFT)) | ((uint64_t)ss << SS_SHIFT);
	uc->uc_mcontext.gregs[REG_CSGSFS] = (greg_t)v;
}

static void on_sigusr1(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;

	(void)sig;
	(void)info;
	uc->uc_flags |= UC_STRICT_RESTORE_SS;
	set_frame_ss(uc, bad_ss); /* rt_sigreturn's IRET will fault on it */
}

static void on_fault(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;

	(void)info;
	if (frame_ss(uc) != bad_ss) {
		/* Not our bad IRET: let the real fault kill us. */
		signal(sig, SIG_DFL);
		return;
	}
	set_frame_ss(uc, good_ss);
	faults = faults + 1;
}

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("bad-iret-loop", argc, argv, "");
	struct sigaction sa;
	pid_t self = getpid();
	uint16_t cs;

	__asm__ volatile("mov %%ss, %0" : "=r"(good_ss));
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	bad_ss = cs; /* a code segment selector: loading it into SS is #GP */

	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sa.sa_sigaction = on_sigusr1;
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("bad-iret-loop: sigaction(SIGUSR1)");
		return 2;
	}
	sa.sa_sigaction = on_fault;
	if (sigaction(SIGSEGV, &sa, NULL) != 0 || sigaction(SIGBUS, &sa, NULL) != 0) {
		perror("bad-iret-loop: sigaction(SIGSEGV/SIGBUS)");
		return 2;
	}

	/* One round before the marker: fail loudly if the kernel does not fault. */
	if (kill(self, SIGUSR1) != 0) {
		perror("bad-iret-loop: kill");
		return 2;
	}
	if (faults != 1) {
		fprintf(stderr,
			"bad-iret-loop: rt_sigreturn with SS=%#x did not fault (faults=%d)\n",
			bad_ss, (int)faults);
		return 3;
	}

	cr3rig_marker("bad-iret-loop", cpu);
	for (;;) {
		if (kill(self, SIGUSR1) != 0) {
			perror("bad-iret-loop: kill");
			return 2;
		}
	}
}

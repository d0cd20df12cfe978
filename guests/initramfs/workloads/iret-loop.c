/*
 * iret-loop <cpu>: pin to <cpu>, then send itself SIGUSR1 forever, so that
 * the kernel keeps returning to user mode through IRET instead of SYSRET.
 *
 * On x86-64 a syscall only returns with SYSRET if the saved registers allow
 * it: RCX == RIP, R11 == RFLAGS, canonical RIP, user CS/SS, no RF/TF.
 * Otherwise the kernel leaves through swapgs_restore_regs_and_return_to_usermode,
 * which ends in IRETQ.  In Linux 6.1 (Debian bookworm) these checks are the
 * "SYSRET requires RCX == RIP" compare-and-branch sequence in entry_SYSCALL_64
 * (arch/x86/entry/entry_64.S) after do_syscall_64 returns; since 6.8 they
 * live in C and do_syscall_64 returns false to select IRET.
 *
 * Each iteration takes that IRET path twice:
 *
 *   1. kill(getpid(), SIGUSR1): the signal is delivered on the way out of the
 *      syscall; setting up the signal frame points RIP at the handler while
 *      RCX still holds the old return address, so RCX != RIP -> IRET.
 *   2. The handler returns through glibc's restorer into rt_sigreturn, which
 *      reloads all registers from the signal frame.  Since Linux 5.8 dropped
 *      force_iret(), sigreturn is NOT unconditionally IRET: the frame saved
 *      at the kill syscall has RCX == RIP and R11 == RFLAGS, so the kernel
 *      could use SYSRET.  The handler therefore overwrites the saved RCX
 *      (dead anyway: the `syscall` instruction in kill() clobbers it), which
 *      makes RCX != RIP after sigreturn and forces IRET here as well.
 */
#include "workload.h"

#include <signal.h>
#include <ucontext.h>

static volatile sig_atomic_t handled;

static void on_sigusr1(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;

	(void)sig;
	(void)info;
	/* RCX != RIP in the restored frame: rt_sigreturn must return via IRET. */
	uc->uc_mcontext.gregs[REG_RCX] = 0;
	handled = handled + 1;
}

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("iret-loop", argc, argv, "");
	struct sigaction sa;
	pid_t self = getpid();

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigusr1;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("iret-loop: sigaction");
		return 2;
	}

	cr3rig_marker("iret-loop", cpu);
	for (;;) {
		if (kill(self, SIGUSR1) != 0) {
			perror("iret-loop: kill");
			return 2;
		}
	}
}

/*
 * syscall-loop <cpu>: pin to <cpu>, then execute raw `syscall` instructions
 * (getppid) forever.
 *
 * Each iteration enters the kernel through entry_SYSCALL_64 and, because
 * getppid leaves RCX/R11 (the saved RIP/RFLAGS) untouched, leaves it through
 * the SYSRET fast path.
 *
 * Why raw inline asm instead of getppid()/syscall(): it guarantees exactly one
 * `syscall` instruction per iteration with nothing else around it: no libc
 * wrapper, errno handling or PID caching, and no chance of a vDSO call that
 * never enters the kernel.  That keeps the user-mode side of the loop to a
 * handful of instructions, which is easy to single-step.
 */
#include "workload.h"

#include <sys/syscall.h>

static inline long raw_getppid(void)
{
	long ret;

	/* The syscall instruction clobbers RCX (return RIP) and R11 (RFLAGS). */
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "0"((long)__NR_getppid)
			 : "rcx", "r11", "memory");
	return ret;
}

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("syscall-loop", argc, argv, "");

	cr3rig_marker("syscall-loop", cpu);
	for (;;)
		(void)raw_getppid();
}

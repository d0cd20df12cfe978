/*
 * timer-spin <cpu>: pin to <cpu>, arm a 10 ms CPU-time interval timer
 * (ITIMER_PROF, a POSIX CPU timer), then spin in user mode like user-spin.
 * While a CPU-time timer is armed the kernel keeps the CPU's tick running to
 * account the time (tick dependency TICK_DEP_BIT_POSIX_TIMER), even on a
 * nohz_full CPU, whose tick otherwise stops while one task runs there: <cpu>
 * takes a local APIC timer interrupt from user mode every tick (4 ms at
 * HZ=250), and a SIGPROF whose handler does nothing every 10 ms of CPU time.
 * That is how an interrupt from user mode arrives there without anything
 * outside the CPU sending one.
 *
 * Not ITIMER_REAL: an hrtimer armed on a nohz_full CPU is queued on a
 * housekeeping CPU (timer migration), whose expiry reaches <cpu> as a
 * reschedule IPI; and with timer migration off, a kernel without
 * CONFIG_HIGH_RES_TIMERS (the reference ones) runs it from <cpu>'s residual
 * tick, a few times a second.
 */
#include "workload.h" /* first: it defines _GNU_SOURCE */

#include <signal.h>
#include <sys/time.h>

static void on_prof(int sig)
{
	(void)sig;
}

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("timer-spin", argc, argv, "");
	struct itimerval every_10ms = { { 0, 10000 }, { 0, 10000 } };
	struct sigaction sa;
	volatile unsigned long counter = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_prof;
	if (sigaction(SIGPROF, &sa, NULL) != 0 || setitimer(ITIMER_PROF, &every_10ms, NULL) != 0) {
		perror("timer-spin: sigaction/setitimer");
		return 2;
	}
	cr3rig_marker("timer-spin", cpu);
	for (;;) {
		counter = counter + 1;
		__asm__ volatile("pause" ::: "memory");
	}
}

/*
 * timer-spin <cpu>: pin to <cpu>, arm a 10 ms interval timer (ITIMER_REAL, an
 * hrtimer of the CPU that armed it), then spin in user mode like user-spin.
 * Each expiry is a local APIC timer interrupt taken from user mode on <cpu>,
 * then a SIGALRM whose handler does nothing.  On a nohz_full CPU, whose tick
 * stops while one task runs there, this is how an interrupt from user mode
 * arrives without anything outside the CPU sending one.
 */
#include "workload.h" /* first: it defines _GNU_SOURCE */

#include <signal.h>
#include <sys/time.h>

static void on_alarm(int sig)
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
	sa.sa_handler = on_alarm;
	if (sigaction(SIGALRM, &sa, NULL) != 0 || setitimer(ITIMER_REAL, &every_10ms, NULL) != 0) {
		perror("timer-spin: sigaction/setitimer");
		return 2;
	}
	cr3rig_marker("timer-spin", cpu);
	for (;;) {
		counter = counter + 1;
		__asm__ volatile("pause" ::: "memory");
	}
}

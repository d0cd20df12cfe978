/*
 * timer-spin <cpu>: pin to <cpu>, arm a 10 ms interval timer (ITIMER_REAL, an
 * hrtimer of the CPU that armed it), then spin in user mode like user-spin.
 * Each expiry is a local APIC timer interrupt taken from user mode on <cpu>,
 * then a SIGALRM whose handler does nothing.  On a nohz_full CPU, whose tick
 * stops while one task runs there, this is how an interrupt from user mode
 * arrives without anything outside the CPU sending one.
 *
 * It first turns timer migration off (kernel.timer_migration = 0, for the rest of
 * the boot): with it on, an hrtimer armed on a nohz_full CPU is queued on a
 * housekeeping CPU (get_target_base -> get_nohz_timer_target), whose expiry then
 * reaches <cpu> as a reschedule IPI, and <cpu>'s only local timer interrupts
 * are its residual tick (about one a second).
 */
#include "workload.h" /* first: it defines _GNU_SOURCE */

#include <signal.h>
#include <fcntl.h>
#include <sys/time.h>
#include <unistd.h>

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

	int fd = open("/proc/sys/kernel/timer_migration", O_WRONLY);

	if (fd < 0 || write(fd, "0\n", 2) != 2) {
		perror("timer-spin: kernel.timer_migration = 0");
		return 2;
	}
	close(fd);
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

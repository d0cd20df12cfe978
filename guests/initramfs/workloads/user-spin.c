/*
 * user-spin <cpu>: pin to <cpu>, then spin in pure user mode forever, with no
 * syscalls and no page faults after the marker line.  The CPU only enters the
 * kernel when something external (timer tick, IPI, injected NMI) interrupts
 * it, so it is the workload to use when an interrupt must arrive while the
 * CPU is in user mode.
 */
#include "workload.h"

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("user-spin", argc, argv, "");
	volatile unsigned long counter = 0;

	cr3rig_marker("user-spin", cpu);
	for (;;) {
		counter = counter + 1;
		__asm__ volatile("pause" ::: "memory");
	}
}

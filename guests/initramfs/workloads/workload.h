/*
 * Shared helpers for the cr3rig guest workloads.
 *
 * Every workload takes the CPU to pin to as argv[1], pins itself with
 * sched_setaffinity (exit 2 with a message on failure) and then prints a
 * single marker line
 *
 *     CR3RIG-WORKLOAD <name> cpu=<N> pid=<pid>
 *
 * to stdout (flushed) right before it enters its main loop.  Keep the marker
 * in sync with WORKLOAD_MARKER in rig/initramfs.py.
 */
#ifndef CR3RIG_WORKLOAD_H
#define CR3RIG_WORKLOAD_H

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CR3RIG_WORKLOAD_MARKER "CR3RIG-WORKLOAD"

/* Parse a decimal CPU number; exit 2 on garbage. */
static inline int cr3rig_parse_cpu(const char *name, const char *arg)
{
	char *end = NULL;
	long cpu;

	errno = 0;
	cpu = strtol(arg, &end, 10);
	if (errno != 0 || end == arg || *end != '\0' || cpu < 0 ||
	    cpu >= CPU_SETSIZE) {
		fprintf(stderr, "%s: bad cpu number '%s'\n", name, arg);
		exit(2);
	}
	return (int)cpu;
}

/* Pin the calling process to @cpu; exit 2 with a message on failure. */
static inline void cr3rig_pin(const char *name, int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0) {
		fprintf(stderr, "%s: sched_setaffinity(cpu %d) failed: %s\n",
			name, cpu, strerror(errno));
		exit(2);
	}
}

/* Parse argv[1], pin to it and return the CPU number. */
static inline int cr3rig_setup(const char *name, int argc, char **argv,
			       const char *usage_tail)
{
	int cpu;

	if (argc < 2) {
		fprintf(stderr, "usage: %s <cpu>%s\n", name, usage_tail);
		exit(2);
	}
	cpu = cr3rig_parse_cpu(name, argv[1]);
	cr3rig_pin(name, cpu);
	return cpu;
}

/* Print the one marker line; flushed so a pexpect driver sees it at once. */
static inline void cr3rig_marker(const char *name, int cpu)
{
	printf("%s %s cpu=%d pid=%ld\n", CR3RIG_WORKLOAD_MARKER, name, cpu,
	       (long)getpid());
	fflush(stdout);
}

#endif /* CR3RIG_WORKLOAD_H */

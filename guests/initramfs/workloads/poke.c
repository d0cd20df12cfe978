/*
 * poke <cpu> <hex-address> [hex-value]: pin to <cpu>, then write a 32-bit
 * value (default 0xc3c3c3c3) to <hex-address> from user mode.
 *
 * For a kernel (or unmapped) address the write faults and the process dies
 * with SIGSEGV, which the shell reports as "Segmentation fault".  If the
 * write succeeded, "CR3RIG-POKE wrote" is printed, so a test can tell a
 * missing fault from a crash of something else.  Unlike the other workloads
 * it does not loop: it exits 0 after a successful write.
 */
#include "workload.h"

#include <stdint.h>

#define DEFAULT_VALUE 0xc3c3c3c3u

static unsigned long long parse_hex(const char *what, const char *arg,
				    unsigned long long max)
{
	char *end = NULL;
	unsigned long long v;

	errno = 0;
	v = strtoull(arg, &end, 16);
	if (errno != 0 || end == arg || *end != '\0' || v > max) {
		fprintf(stderr, "poke: bad %s '%s'\n", what, arg);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	int cpu;
	uintptr_t addr;
	uint32_t value = DEFAULT_VALUE;

	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: poke <cpu> <hex-address> [hex-value]\n");
		return 2;
	}
	cpu = cr3rig_setup("poke", argc, argv, " <hex-address> [hex-value]");
	addr = (uintptr_t)parse_hex("address", argv[2], UINTPTR_MAX);
	if (argc == 4)
		value = (uint32_t)parse_hex("value", argv[3], UINT32_MAX);

	cr3rig_marker("poke", cpu);
	*(volatile uint32_t *)addr = value; /* SIGSEGV here for kernel memory */
	printf("CR3RIG-POKE wrote 0x%08x to 0x%016lx\n", (unsigned)value,
	       (unsigned long)addr);
	fflush(stdout);
	return 0;
}

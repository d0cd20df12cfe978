/*
 * read-fault-loop <cpu>: pin to <cpu>, then take short user-mode page faults forever.
 *
 * As fault-loop, but each pass reads one byte of each page of a 1 MiB anonymous
 * region: a read fault on anonymous memory maps the shared zero page, so the fault
 * path allocates and clears nothing (fault-loop's write faults zero a page each, a
 * `rep stosb` of 4,096 single steps when stepped). The region's page table is
 * allocated by the first pass only: MADV_DONTNEED drops the pages, not the table.
 * A kernel without madvise (no CONFIG_ADVISE_SYSCALLS, as the reference kernels)
 * gets a fresh mapping instead, as in fault-loop: then the first fault of a pass
 * allocates (and zeroes) a page table.
 */
#include "workload.h"

#include <errno.h>
#include <sys/mman.h>

#define REGION_PAGES 256

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("read-fault-loop", argc, argv, "");
	long page = sysconf(_SC_PAGESIZE);
	size_t len = (size_t)page * REGION_PAGES;
	volatile char *region;
	volatile char sink;

	region = mmap(NULL, len, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) {
		perror("read-fault-loop: mmap");
		return 2;
	}
	(void)madvise((void *)region, len, MADV_NOHUGEPAGE);

	cr3rig_marker("read-fault-loop", cpu);
	for (;;) {
		for (size_t off = 0; off < len; off += (size_t)page)
			sink = region[off]; /* read fault: maps the zero page */
		if (madvise((void *)region, len, MADV_DONTNEED) == 0)
			continue;
		if (errno != ENOSYS) {
			perror("read-fault-loop: madvise");
			return 2;
		}
		if (munmap((void *)region, len) != 0) {
			perror("read-fault-loop: munmap");
			return 2;
		}
		region = mmap(NULL, len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (region == MAP_FAILED) {
			perror("read-fault-loop: mmap");
			return 2;
		}
	}
	(void)sink;
}

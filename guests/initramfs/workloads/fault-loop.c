/*
 * fault-loop <cpu>: pin to <cpu>, then take user-mode page faults forever.
 *
 * A 1 MiB anonymous region is mapped once.  The loop writes one byte to each
 * of its pages (every first write is a #PF from user mode: asm_exc_page_fault
 * -> do_anonymous_page), then discards all pages with a single
 * madvise(MADV_DONTNEED) so the next pass faults again.  That is 256 faults
 * per syscall, so nearly all the time goes to user mode plus the fault path
 * rather than to mmap/munmap. A kernel without madvise (no
 * CONFIG_ADVISE_SYSCALLS) gets a fresh mapping at the same address instead.
 *
 * MADV_NOHUGEPAGE keeps transparent huge pages from turning 256 faults into
 * one (the region is smaller than 2 MiB anyway, but be explicit).
 */
#include "workload.h"

#include <errno.h>
#include <sys/mman.h>

#define REGION_PAGES 256

int main(int argc, char **argv)
{
	int cpu = cr3rig_setup("fault-loop", argc, argv, "");
	long page = sysconf(_SC_PAGESIZE);
	size_t len = (size_t)page * REGION_PAGES;
	volatile char *region;

	region = mmap(NULL, len, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) {
		perror("fault-loop: mmap");
		return 2;
	}
	(void)madvise((void *)region, len, MADV_NOHUGEPAGE);

	cr3rig_marker("fault-loop", cpu);
	for (;;) {
		for (size_t off = 0; off < len; off += (size_t)page)
			region[off] = 1; /* write fault: allocates a page */
		/*
		 * Drop the pages so the next pass faults again. Kernels built
		 * without ADVISE_SYSCALLS (tinyconfig) have no madvise: unmap
		 * and map the region afresh instead.
		 */
		if (madvise((void *)region, len, MADV_DONTNEED) == 0)
			continue;
		if (errno != ENOSYS) {
			perror("fault-loop: madvise");
			return 2;
		}
		if (munmap((void *)region, len) != 0) {
			perror("fault-loop: munmap");
			return 2;
		}
		region = mmap(NULL, len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (region == MAP_FAILED) {
			perror("fault-loop: mmap");
			return 2;
		}
	}
}

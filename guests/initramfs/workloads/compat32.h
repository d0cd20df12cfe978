/*
 * Freestanding helpers for the 32-bit (compat mode) cr3rig workloads.
 *
 * These programs are i386 ELF executables run by a 64-bit kernel with
 * CONFIG_IA32_EMULATION.  They are built with the host's x86-64 gcc alone
 * (gcc -m32 -nostdlib -static -ffreestanding, see COMPAT_CFLAGS in
 * rig/supply/initramfs.py), so no 32-bit C library (gcc-multilib) is needed:
 * this header includes no system header and makes every system call itself.
 *
 * A workload source defines
 *
 *     static const char cr3rig_name[] = "...";
 *     static long cr3rig_loop_syscall(long nr);   (enters the kernel its way)
 *     static const char cr3rig_refused_vendor[];  (CPUID vendor it must not
 *                                                  run on, "" for none)
 *     static const char cr3rig_refused_hint[];    (why, and what to do)
 *
 * and optionally, before including it,
 *
 *     #define CR3RIG_SETUP cr3rig_setup   (static void cr3rig_setup(void),
 *                                          run once before the marker line)
 *
 * and includes this header, which provides _start: it parses argv[1] as the
 * CPU, pins itself (exit 2 with a message on failure), checks that the
 * kernel mapped the 32-bit vDSO and that the CPU vendor is not the refused
 * one (exit 2 with a message), runs CR3RIG_SETUP if defined, prints the
 * marker line of workload.h
 *
 *     CR3RIG-WORKLOAD <name> cpu=<N> pid=<pid>
 *
 * and then calls cr3rig_loop_syscall(__NR_getpid) forever, exiting 3 if a
 * result is not the pid (so a broken entry path cannot loop silently).
 *
 * Set-up system calls use int $0x80 directly (the legacy gate, which every
 * 64-bit kernel with IA32 emulation accepts); only the loop uses the gate
 * under test.
 */
#ifndef CR3RIG_COMPAT32_H
#define CR3RIG_COMPAT32_H

#if !defined(__i386__)
#error "compat32.h is for the 32-bit workloads (gcc -m32)"
#endif

#define CR3RIG_WORKLOAD_MARKER "CR3RIG-WORKLOAD"

/* i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl). */
#define NR32_exit 1
#define NR32_write 4
#define NR32_getpid 20
#define NR32_sched_setaffinity 241
#define NR32_exit_group 252

/* Auxiliary vector tags (include/uapi/linux/auxvec.h, asm/auxvec.h). */
#define AT_NULL 0
#define AT_SYSINFO 32
#define AT_SYSINFO_EHDR 33

/* Bits in a sched_setaffinity mask (CPU_SETSIZE of glibc). */
#define CR3RIG_CPU_SETSIZE 1024


static inline long int80_3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "d"(c)
			 : "memory", "cc");
	return ret;
}

static unsigned long cr3rig_strlen(const char *s)
{
	unsigned long n = 0;

	while (s[n] != '\0')
		n++;
	return n;
}

static void cr3rig_puts(int fd, const char *s)
{
	unsigned long len = cr3rig_strlen(s), done = 0;

	while (done < len) {
		long r = int80_3(NR32_write, fd, (long)(s + done), (long)(len - done));

		if (r <= 0)
			return;
		done += (unsigned long)r;
	}
}

/* Append the decimal form of @v to @buf at @pos; return the new end. */
static unsigned long cr3rig_put_ulong(char *buf, unsigned long pos, unsigned long v)
{
	char digits[12];
	int n = 0;

	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v != 0);
	while (n > 0)
		buf[pos++] = digits[--n];
	return pos;
}

static unsigned long cr3rig_put_str(char *buf, unsigned long pos, const char *s)
{
	while (*s != '\0')
		buf[pos++] = *s++;
	return pos;
}

static __attribute__((noreturn)) void cr3rig_exit(int status)
{
	for (;;)
		int80_3(NR32_exit_group, status, 0, 0);
}

/* Print "<name>: <what><detail>" to stderr and exit 2. */
static __attribute__((noreturn)) void cr3rig_die(const char *what, const char *detail)
{
	cr3rig_puts(2, cr3rig_name);
	cr3rig_puts(2, ": ");
	cr3rig_puts(2, what);
	cr3rig_puts(2, detail);
	cr3rig_puts(2, "\n");
	cr3rig_exit(2);
}

/* Parse a decimal CPU number below CR3RIG_CPU_SETSIZE; -1 on garbage. */
static int cr3rig_parse_cpu(const char *s)
{
	int cpu = 0;

	if (*s == '\0')
		return -1;
	for (; *s != '\0'; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		cpu = cpu * 10 + (*s - '0');
		if (cpu >= CR3RIG_CPU_SETSIZE)
			return -1;
	}
	return cpu;
}

static long cr3rig_loop_syscall(long nr);
#ifdef CR3RIG_SETUP
static void CR3RIG_SETUP(void);
#endif

/* The 12-character CPUID vendor string (leaf 0) into @out[13]. */
static void cr3rig_cpu_vendor(char out[13])
{
	unsigned int a = 0, b, c, d;
	unsigned int words[3];
	int i;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
	words[0] = b;
	words[1] = d;
	words[2] = c;
	for (i = 0; i < 12; i++)
		out[i] = (char)(words[i / 4] >> (8 * (i % 4)));
	out[12] = '\0';
}

static int cr3rig_streq(const char *a, const char *b)
{
	while (*a != '\0' && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

/* Called by _start with the initial stack: argc, argv[], NULL, envp[], NULL, auxv[]. */
__attribute__((noreturn, used)) void cr3rig_start32(unsigned long *sp)
{
	unsigned long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long *p = sp + 1 + argc + 1;
	unsigned long mask[CR3RIG_CPU_SETSIZE / 32];
	unsigned long vdso = 0, i;
	char line[128];
	unsigned long pos = 0;
	long pid, ret;
	int cpu;

	while (*p != 0) /* skip envp */
		p++;
	for (p++; p[0] != AT_NULL; p += 2)
		if (p[0] == AT_SYSINFO_EHDR)
			vdso = p[1];

	if (argc < 2) {
		cr3rig_puts(2, "usage: ");
		cr3rig_puts(2, cr3rig_name);
		cr3rig_puts(2, " <cpu>\n");
		cr3rig_exit(2);
	}
	cpu = cr3rig_parse_cpu(argv[1]);
	if (cpu < 0)
		cr3rig_die("bad cpu number ", argv[1]);
	for (i = 0; i < CR3RIG_CPU_SETSIZE / 32; i++)
		mask[i] = 0;
	mask[cpu / 32] = 1UL << (cpu % 32);
	ret = int80_3(NR32_sched_setaffinity, 0, sizeof(mask), (long)mask);
	if (ret != 0)
		cr3rig_die("sched_setaffinity failed for cpu ", argv[1]);
	/*
	 * SYSENTER and 32-bit SYSCALL return to the int80_landing_pad of the
	 * 32-bit vDSO; without one (vdso32=0) they cannot come back.
	 */
	if (vdso == 0)
		cr3rig_die("no 32-bit vDSO (AT_SYSINFO_EHDR missing; booted with vdso32=0?)", "");

	if (cr3rig_refused_vendor[0] != '\0') {
		char vendor[13];

		cr3rig_cpu_vendor(vendor);
		if (cr3rig_streq(vendor, cr3rig_refused_vendor)) {
			cr3rig_puts(2, cr3rig_name);
			cr3rig_puts(2, ": refusing to run on CPU vendor ");
			cr3rig_puts(2, vendor);
			cr3rig_puts(2, ": ");
			cr3rig_puts(2, cr3rig_refused_hint);
			cr3rig_puts(2, "\n");
			cr3rig_exit(2);
		}
	}

#ifdef CR3RIG_SETUP
	CR3RIG_SETUP();
#endif

	pid = int80_3(NR32_getpid, 0, 0, 0);
	pos = cr3rig_put_str(line, pos, CR3RIG_WORKLOAD_MARKER " ");
	pos = cr3rig_put_str(line, pos, cr3rig_name);
	pos = cr3rig_put_str(line, pos, " cpu=");
	pos = cr3rig_put_ulong(line, pos, (unsigned long)cpu);
	pos = cr3rig_put_str(line, pos, " pid=");
	pos = cr3rig_put_ulong(line, pos, (unsigned long)pid);
	line[pos++] = '\n';
	line[pos] = '\0';
	cr3rig_puts(1, line);

	for (;;) {
		ret = cr3rig_loop_syscall(NR32_getpid);
		if (ret != pid) {
			cr3rig_puts(2, cr3rig_name);
			cr3rig_puts(2, ": getpid through the gate under test returned a wrong value\n");
			cr3rig_exit(3);
		}
	}
}

/* The ELF entry point: hand the initial stack to cr3rig_start32 (16-byte aligned call). */
__asm__(".text\n"
	".globl _start\n"
	".type _start, @function\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	movl %esp, %eax\n"
	"	andl $-16, %esp\n"
	"	subl $12, %esp\n"
	"	pushl %eax\n"
	"	call cr3rig_start32\n"
	"	hlt\n");

#endif /* CR3RIG_COMPAT32_H */

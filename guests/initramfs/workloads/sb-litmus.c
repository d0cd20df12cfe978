/*
 * sb-litmus <variant> <n> [<cpu-p0> <cpu-p1>]: the store-buffering (SB) shape on two
 * CPUs, <n> times, counting the relaxed outcome; then exit 0.
 *
 * Two threads, P0 pinned to <cpu-p0> (default 1, the rig's isolated vCPU) and P1 to
 * <cpu-p1> (default 0), run iteration i = 1..n as
 *
 *     P0: x := i; <P0's barrier>; r0 := y        P1: y := i; <P1's barrier>; r1 := x
 *
 * and an iteration is *relaxed* when both loads read the previous iteration's value
 * (r0 < i and r1 < i): each load passed its own CPU's earlier store. x86-TSO allows
 * that outcome with no barrier and forbids it when both sides have a full barrier.
 * The barriers per variant:
 *
 *     a   none on either side (plain store, then load)
 *     b   MFENCE on both sides
 *     c   P0: a `syscall` instruction (getppid) in place of the fence, whose kernel
 *         entry and exit write CR3 under PTI (serializing); P1: MFENCE
 *     d   P0: a delay loop of DELAY_LOOPS register-only iterations in place of the
 *         fence (no barrier, about as long as variant c's system call under TCG);
 *         P1: MFENCE. The control for c: a zero here says that c's zero can come
 *         from time alone (the store left the store buffer during the wait).
 *
 * Each side is one inline-asm block (store, barrier, load), so the compiler can put
 * nothing in between. Iterations are separated by a spin barrier on two per-thread
 * counters (each thread publishes the iteration it reached and waits for the other
 * one's): no sleeps, no system calls outside variant c's. The barrier also orders
 * the iterations: P1 cannot store y := i before P0's load of iteration i - 1 has
 * read y, since P0 publishes i only after that load (x86 keeps a load before a later
 * store), so a value below i is always the previous iteration's.
 *
 * Output: the marker line of workload.h once both threads are pinned (cpu= names
 * P0's CPU), then one line
 *
 *     CR3RIG-SB variant=a n=1000000 relaxed=12 old0=3012 old1=2950 seconds=4.213 cpus=1,0
 *
 * relaxed: iterations where both loads read the old value; old0/old1: iterations where
 * P0's / P1's load did (with or without the other); seconds: the loop's wall time in
 * the guest. Bad arguments or a failed pin: a message on stderr, exit 2.
 * Keep the line in step with rig/tools/tcgorder.py (its parser).
 */
#include "workload.h"

#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>

#define NAME "sb-litmus"
/* Most iterations the bitmaps (n / 4 bytes) may cover: 1e9 is 250 MB of guest memory. */
#define MAX_N 1000000000L
/* Variant d's wait: iterations of a register-only loop (dec, jnz). */
#define DELAY_LOOPS 4000
/* Spins on the other thread's counter before each further one adds a PAUSE. */
#define EAGER_SPINS 1000

/* One counter per 64-byte line, so the two threads share no line by accident. */
struct line {
	volatile long v;
	char pad[64 - sizeof(long)];
} __attribute__((aligned(64)));

static struct line x, y, reached[2];

struct side {
	int index;		/* 0: P0, 1: P1 */
	int cpu;
	char op;		/* 'p' plain, 'm' MFENCE, 's' syscall, 'd' delay loop */
	long n;
	uint64_t *old;		/* bit i - 1: this side's load read the old value */
	volatile long *mine;
	volatile long *other;
};

static inline long sb_plain(volatile long *mine, volatile long *other, long v)
{
	long r;

	__asm__ volatile("movq %[v], %[m]\n\t"
			 "movq %[o], %[r]"
			 : [m] "=m"(*mine), [r] "=r"(r)
			 : [o] "m"(*other), [v] "r"(v)
			 : "memory");
	return r;
}

static inline long sb_mfence(volatile long *mine, volatile long *other, long v)
{
	long r;

	__asm__ volatile("movq %[v], %[m]\n\t"
			 "mfence\n\t"
			 "movq %[o], %[r]"
			 : [m] "=m"(*mine), [r] "=r"(r)
			 : [o] "m"(*other), [v] "r"(v)
			 : "memory");
	return r;
}

static inline long sb_syscall(volatile long *mine, volatile long *other, long v)
{
	long r, nr = __NR_getppid;

	/* syscall clobbers RCX (return RIP) and R11 (RFLAGS); RAX gets the result. */
	__asm__ volatile("movq %[v], %[m]\n\t"
			 "syscall\n\t"
			 "movq %[o], %[r]"
			 : [m] "=m"(*mine), [r] "=r"(r), "+a"(nr)
			 : [o] "m"(*other), [v] "r"(v)
			 : "rcx", "r11", "memory");
	return r;
}

static inline long sb_delay(volatile long *mine, volatile long *other, long v)
{
	long r, loops = DELAY_LOOPS;

	__asm__ volatile("movq %[v], %[m]\n\t"
			 "1: decq %[k]\n\t"
			 "jnz 1b\n\t"
			 "movq %[o], %[r]"
			 : [m] "=m"(*mine), [r] "=r"(r), [k] "+r"(loops)
			 : [o] "m"(*other), [v] "r"(v)
			 : "cc", "memory");
	return r;
}

/* Publish that this side reached iteration @i; wait until the other side has too. */
static void meet(int me, long i)
{
	unsigned long spins = 0;

	reached[me].v = i;
	while (reached[!me].v < i)
		if (++spins > EAGER_SPINS)
			__asm__ volatile("pause" ::: "memory");
}

static void *run_side(void *arg)
{
	struct side *s = arg;
	uint64_t word = 0;
	long i, r;

	for (i = 1; i <= s->n; i++) {
		meet(s->index, i);
		if (s->op == 'p')
			r = sb_plain(s->mine, s->other, i);
		else if (s->op == 'm')
			r = sb_mfence(s->mine, s->other, i);
		else if (s->op == 's')
			r = sb_syscall(s->mine, s->other, i);
		else
			r = sb_delay(s->mine, s->other, i);
		word |= (uint64_t)(r < i) << ((i - 1) & 63);
		if (((i - 1) & 63) == 63 || i == s->n) {
			s->old[(i - 1) >> 6] = word;
			word = 0;
		}
	}
	return NULL;
}

static void *pinned_side(void *arg)
{
	struct side *s = arg;

	cr3rig_pin(NAME, s->cpu);
	meet(s->index, 0);
	return run_side(s);
}

static long parse_n(const char *arg)
{
	char *end = NULL;
	long n;

	errno = 0;
	n = strtol(arg, &end, 10);
	if (errno != 0 || end == arg || *end != '\0' || n < 1 || n > MAX_N) {
		fprintf(stderr, "%s: bad iteration count '%s' (1..%ld)\n", NAME, arg, MAX_N);
		exit(2);
	}
	return n;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct side p0 = { .index = 0, .mine = &x.v, .other = &y.v };
	struct side p1 = { .index = 1, .mine = &y.v, .other = &x.v };
	long words, k, relaxed = 0, old0 = 0, old1 = 0;
	const char *variant;
	pthread_t thread;
	double start, seconds;
	int err;

	if (argc != 3 && argc != 5) {
		fprintf(stderr, "usage: %s <a|b|c|d> <n> [<cpu-p0> <cpu-p1>]\n", NAME);
		exit(2);
	}
	variant = argv[1];
	if (strcmp(variant, "a") == 0) {
		p0.op = 'p';
		p1.op = 'p';
	} else if (strcmp(variant, "b") == 0) {
		p0.op = 'm';
		p1.op = 'm';
	} else if (strcmp(variant, "c") == 0) {
		p0.op = 's';
		p1.op = 'm';
	} else if (strcmp(variant, "d") == 0) {
		p0.op = 'd';
		p1.op = 'm';
	} else {
		fprintf(stderr,
			"%s: bad variant '%s' (a: plain, b: MFENCE, c: syscall/MFENCE, d: delay/MFENCE)\n",
			NAME, variant);
		exit(2);
	}
	p0.n = p1.n = parse_n(argv[2]);
	p0.cpu = argc == 5 ? cr3rig_parse_cpu(NAME, argv[3]) : 1;
	p1.cpu = argc == 5 ? cr3rig_parse_cpu(NAME, argv[4]) : 0;
	if (p0.cpu == p1.cpu) {
		fprintf(stderr, "%s: P0 and P1 need two different CPUs, not %d twice\n", NAME, p0.cpu);
		exit(2);
	}
	words = (p0.n + 63) / 64;
	p0.old = calloc((size_t)words, sizeof(uint64_t));
	p1.old = calloc((size_t)words, sizeof(uint64_t));
	if (p0.old == NULL || p1.old == NULL) {
		fprintf(stderr, "%s: no memory for %ld iterations\n", NAME, p0.n);
		exit(2);
	}

	/* P1 runs on this thread: pin it before P0 starts, so both pins come first. */
	cr3rig_pin(NAME, p1.cpu);
	err = pthread_create(&thread, NULL, pinned_side, &p0);
	if (err != 0) {
		fprintf(stderr, "%s: pthread_create: %s\n", NAME, strerror(err));
		exit(2);
	}
	meet(1, 0);
	cr3rig_marker(NAME, p0.cpu);
	start = now();
	run_side(&p1);
	pthread_join(thread, NULL);
	seconds = now() - start;

	for (k = 0; k < words; k++) {
		relaxed += __builtin_popcountll(p0.old[k] & p1.old[k]);
		old0 += __builtin_popcountll(p0.old[k]);
		old1 += __builtin_popcountll(p1.old[k]);
	}
	printf("CR3RIG-SB variant=%s n=%ld relaxed=%ld old0=%ld old1=%ld seconds=%.3f cpus=%d,%d\n",
	       variant, p0.n, relaxed, old0, old1, seconds, p0.cpu, p1.cpu);
	return 0;
}

/*
 * cr3watch: a QEMU TCG plugin that records every execution of the CR3 switch sites of
 * a Linux guest, for rig.observe.pluginwatch (which does all the checking).
 *
 * Loaded with  -plugin cr3watch.so,sites=FILE,sock=PATH
 *
 * FILE has one line per instrumented instruction (written by rig.observe.pluginwatch):
 *     <index> <address hex> <next address hex> <kind> <operand>
 * kind is "cr3" (a CR3 write), "store" (a store to the signal) or "paranoid" (the entry
 * of paranoid_entry); operand is the source register ("rax", ...) or "$<imm hex>" or "-".
 *
 * Nothing is recorded until a client connects to the unix socket PATH and sends its
 * configuration: u32 ncpus, then ncpus u64 addresses (the signal of each vCPU, i.e.
 * __per_cpu_offset[cpu] + the symbol). The plugin answers one text line ("OK\n" or
 * "ERR <why>\n"), then streams records (struct record, little-endian) until the client
 * closes the socket. One client at a time; a new one starts a new stream.
 *
 * At a site (callback before the instruction runs, registers readable): CR3, the
 * operand register and the signal (read through the vCPU's own page tables at that
 * instant) are kept as the vCPU's pending hit. The next instrumented instruction the
 * vCPU executes (normally the one right after the site; an interrupt taken in between
 * runs no CR3 write or signal store that is not itself a site) completes it with CR3
 * and the signal again, and the record is queued. Records are buffered per vCPU and
 * written under one lock, when a buffer fills and when the vCPU goes idle (a vCPU thread
 * blocks in send() while the client is behind: the client paces the guest). A hit begun
 * or queued for one client is never sent to the next (a generation count).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <glib.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAX_VCPUS 64
#define BUF_RECORDS 128

enum role_kind { ROLE_NONE = 0, ROLE_CR3 = 1, ROLE_STORE = 2, ROLE_PARANOID = 3 };
enum record_type { REC_SITE = 1, REC_PARANOID = 2 };
enum record_flags {
    F_SIG_BEFORE = 1,   /* signal_before was readable */
    F_SIG_AFTER = 2,    /* signal_after was readable */
    F_AT_NEXT = 4,      /* completed at the instruction right after the site */
    F_OPERAND = 8,      /* operand holds the value the instruction writes */
    F_CR3_BEFORE_BAD = 16, /* CR3 could not be read before the site (cr3_before is 0) */
    F_CR3_AFTER_BAD = 32,  /* CR3 could not be read after the site (cr3_after is 0) */
};

struct __attribute__((packed)) record {
    uint8_t type;
    uint8_t flags;
    uint16_t cpu;
    uint32_t index;
    uint64_t cr3_before;
    uint64_t operand;
    uint64_t cr3_after;
    uint32_t signal_before;
    uint32_t signal_after;
};
_Static_assert(sizeof(struct record) == 40, "rig.observe.pluginwatch.RECORD is 40 bytes");

/* One instrumented address: a site, the instruction after a site, paranoid_entry. */
struct role {
    uint64_t addr;
    int kind;          /* enum role_kind; ROLE_NONE: only the instruction after a site */
    uint32_t index;    /* the site's line index */
    uint64_t next;     /* the instruction after the site */
    int reg;           /* operand register number (0..15), -1: immediate or none */
    uint64_t imm;
    int has_imm;
};

struct vcpu {
    struct qemu_plugin_register *cr3;
    struct qemu_plugin_register *gpr[16];
    GByteArray *buf;
    int pending;
    struct record rec;
    uint64_t pending_next;
    struct record out[BUF_RECORDS];
    int n_out;
    unsigned generation;  /* the client generation its pending hit and buffer belong to */
};

static const char *gpr_names[16] = {
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};

static GHashTable *roles;            /* uint64 address -> struct role */
static struct vcpu vcpus[MAX_VCPUS];
static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char setup_error[256];

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static int client = -1;              /* the connected client, -1: none */
static int enabled;                  /* a client is connected and configured (atomic) */
static unsigned generation;          /* counts clients (atomic): buffers of an older one are dropped */
static uint64_t signal_addr[MAX_VCPUS];
static unsigned ncpus;

static int reg_number(const char *name)
{
    for (int i = 0; i < 16; i++) {
        if (strcmp(gpr_names[i], name) == 0) {
            return i;
        }
    }
    return -1;
}

static uint64_t read_reg(struct vcpu *v, struct qemu_plugin_register *h, int *ok)
{
    uint64_t val = 0;
    g_byte_array_set_size(v->buf, 0);
    int n = h ? qemu_plugin_read_register(h, v->buf) : -1;
    if (n <= 0 || n > 8) {
        *ok = 0;
        return 0;
    }
    memcpy(&val, v->buf->data, n);
    return val;
}

static int read_signal(struct vcpu *v, unsigned cpu, uint32_t *val)
{
    if (cpu >= ncpus || signal_addr[cpu] == 0) {
        return 0;
    }
    g_byte_array_set_size(v->buf, 0);
    if (!qemu_plugin_read_memory_vaddr(signal_addr[cpu], v->buf, 4)) {
        return 0;
    }
    memcpy(val, v->buf->data, 4);
    return 1;
}

/* Write the vCPU's queued records to the client (drops them if none is connected). */
static void flush(struct vcpu *v)
{
    if (v->n_out == 0) {
        return;
    }
    pthread_mutex_lock(&out_lock);
    /* (generation changes under this lock: records queued for a client that is gone are dropped) */
    if (client >= 0 && v->generation == __atomic_load_n(&generation, __ATOMIC_RELAXED)) {
        const char *p = (const char *)v->out;
        size_t left = (size_t)v->n_out * sizeof(struct record);
        while (left > 0) {
            ssize_t n = send(client, p, left, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                __atomic_store_n(&enabled, 0, __ATOMIC_RELEASE);  /* the client went away */
                break;
            }
            p += n;
            left -= (size_t)n;
        }
    }
    pthread_mutex_unlock(&out_lock);
    v->n_out = 0;
}

static void queue(struct vcpu *v, const struct record *r)
{
    v->out[v->n_out++] = *r;
    if (v->n_out == BUF_RECORDS) {
        flush(v);
    }
}

static void on_insn(unsigned int cpu_index, void *udata)
{
    const struct role *role = udata;
    if (cpu_index >= MAX_VCPUS) {
        return;
    }
    struct vcpu *v = &vcpus[cpu_index];
    if (!__atomic_load_n(&enabled, __ATOMIC_ACQUIRE)) {
        v->pending = 0;  /* a hit begun for an earlier client is not completed for the next */
        v->n_out = 0;
        return;
    }
    unsigned gen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    if (v->generation != gen) {  /* the first instruction for a new client */
        v->generation = gen;
        v->pending = 0;
        v->n_out = 0;
    }
    int ok = 1;
    uint32_t sig = 0;
    uint64_t cr3 = 0;
    int have_sig = 0;
    if (v->pending || role->kind != ROLE_NONE) {
        cr3 = read_reg(v, v->cr3, &ok);
        have_sig = read_signal(v, cpu_index, &sig);
    }
    if (v->pending) {
        v->rec.cr3_after = cr3;
        v->rec.signal_after = sig;
        v->rec.flags |= (have_sig ? F_SIG_AFTER : 0) | (role->addr == v->pending_next ? F_AT_NEXT : 0) |
                         (ok ? 0 : F_CR3_AFTER_BAD);
        v->pending = 0;
        queue(v, &v->rec);
    }
    if (role->kind == ROLE_NONE) {
        return;
    }
    struct record r = {0};
    r.cpu = (uint16_t)cpu_index;
    r.index = role->index;
    r.cr3_before = cr3;
    r.signal_before = sig;
    r.flags = (have_sig ? F_SIG_BEFORE : 0) | (ok ? 0 : F_CR3_BEFORE_BAD);
    if (role->kind == ROLE_PARANOID) {
        r.type = REC_PARANOID;
        queue(v, &r);
        return;
    }
    r.type = REC_SITE;
    if (role->has_imm) {
        r.operand = role->imm;
        r.flags |= F_OPERAND;
    } else if (role->reg >= 0) {
        int rok = 1;
        r.operand = read_reg(v, v->gpr[role->reg], &rok);
        r.flags |= rok ? F_OPERAND : 0;
    }
    v->rec = r;
    v->pending = 1;
    v->pending_next = role->next;
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t addr = qemu_plugin_insn_vaddr(insn);
        struct role *role = g_hash_table_lookup(roles, &addr);
        if (role) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_insn, QEMU_PLUGIN_CB_R_REGS, role);
        }
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int cpu_index)
{
    if (cpu_index >= MAX_VCPUS) {
        snprintf(setup_error, sizeof(setup_error), "vCPU %u: at most %d vCPUs", cpu_index, MAX_VCPUS);
        return;
    }
    struct vcpu *v = &vcpus[cpu_index];
    v->buf = g_byte_array_new();
    GArray *regs = qemu_plugin_get_registers();
    for (guint i = 0; i < regs->len; i++) {
        qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
        if (strcmp(d->name, "cr3") == 0) {
            v->cr3 = d->handle;
        }
        int r = reg_number(d->name);
        if (r >= 0) {
            v->gpr[r] = d->handle;
        }
    }
    g_array_free(regs, TRUE);
    if (!v->cr3) {
        snprintf(setup_error, sizeof(setup_error), "vCPU %u: QEMU's register list has no cr3", cpu_index);
    }
}

static void on_vcpu_idle(qemu_plugin_id_t id, unsigned int cpu_index)
{
    if (cpu_index < MAX_VCPUS) {
        flush(&vcpus[cpu_index]);
    }
}

static int read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return 0;
        }
        p += n;
        len -= (size_t)n;
    }
    return 1;
}

static void reply(int fd, const char *text)
{
    ssize_t n = send(fd, text, strlen(text), MSG_NOSIGNAL);
    (void)n;
}

/* Accept one client at a time: configure, enable, wait for it to close, disable. */
static void *control(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            return NULL;
        }
        uint32_t n = 0;
        uint64_t addrs[MAX_VCPUS] = {0};
        if (!read_full(fd, &n, sizeof(n)) || n == 0 || n > MAX_VCPUS ||
            !read_full(fd, addrs, n * sizeof(uint64_t))) {
            reply(fd, "ERR bad configuration (u32 ncpus 1..64, then one u64 signal address each)\n");
            close(fd);
            continue;
        }
        if (setup_error[0]) {
            char line[300];
            snprintf(line, sizeof(line), "ERR %s\n", setup_error);
            reply(fd, line);
            close(fd);
            continue;
        }
        pthread_mutex_lock(&out_lock);
        memcpy(signal_addr, addrs, sizeof(addrs));
        ncpus = n;
        reply(fd, "OK\n");
        client = fd;
        __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&enabled, 1, __ATOMIC_RELEASE);  /* after the addresses: vCPUs acquire it */
        pthread_mutex_unlock(&out_lock);
        char byte;
        for (;;) {  /* the client sends nothing more; EOF (or an error) ends the stream */
            ssize_t got = read(fd, &byte, 1);
            if (got == 0 || (got < 0 && errno != EINTR)) {
                break;
            }
        }
        pthread_mutex_lock(&out_lock);
        __atomic_store_n(&enabled, 0, __ATOMIC_RELEASE);
        client = -1;
        close(fd);
        pthread_mutex_unlock(&out_lock);
    }
    return NULL;
}

static int parse_sites(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open sites file %s: %s", path, strerror(errno));
        return 0;
    }
    char line[256];
    int lineno = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        unsigned index;
        uint64_t addr, next;
        char kind[16], operand[32];
        if (sscanf(line, "%u %" SCNx64 " %" SCNx64 " %15s %31s", &index, &addr, &next, kind, operand) != 5) {
            snprintf(err, errlen, "%s:%d: expected '<index> <addr> <next> <kind> <operand>'", path, lineno);
            fclose(f);
            return 0;
        }
        struct role *r = g_new0(struct role, 1);
        r->addr = addr;
        r->index = index;
        r->next = next;
        r->reg = -1;
        if (strcmp(kind, "cr3") == 0) {
            r->kind = ROLE_CR3;
        } else if (strcmp(kind, "store") == 0) {
            r->kind = ROLE_STORE;
        } else if (strcmp(kind, "paranoid") == 0) {
            r->kind = ROLE_PARANOID;
        } else {
            snprintf(err, errlen, "%s:%d: unknown kind %s", path, lineno, kind);
            fclose(f);
            return 0;
        }
        if (operand[0] == '$') {
            r->imm = strtoull(operand + 1, NULL, 16);
            r->has_imm = 1;
        } else if (strcmp(operand, "-") != 0) {
            r->reg = reg_number(operand);
            if (r->reg < 0) {
                snprintf(err, errlen, "%s:%d: unknown register %s", path, lineno, operand);
                fclose(f);
                return 0;
            }
        }
        g_hash_table_replace(roles, &r->addr, r);
        if (r->kind != ROLE_PARANOID && !g_hash_table_lookup(roles, &r->next)) {
            struct role *after = g_new0(struct role, 1);
            after->addr = next;
            after->kind = ROLE_NONE;
            after->reg = -1;
            g_hash_table_insert(roles, &after->addr, after);
        }
    }
    fclose(f);
    return 1;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *sites = NULL, *sock = NULL;
    char err[300];
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "sites=", 6) == 0) {
            sites = argv[i] + 6;
        } else if (strncmp(argv[i], "sock=", 5) == 0) {
            sock = argv[i] + 5;
        } else {
            fprintf(stderr, "cr3watch: unknown argument %s (expected sites=FILE,sock=PATH)\n", argv[i]);
            return -1;
        }
    }
    if (!sites || !sock) {
        fprintf(stderr, "cr3watch: needs sites=FILE and sock=PATH\n");
        return -1;
    }
    if (!info->system_emulation) {
        fprintf(stderr, "cr3watch: runs under system emulation only\n");
        return -1;
    }
    if (strlen(sock) >= sizeof(sock_path)) {
        fprintf(stderr, "cr3watch: socket path too long: %s\n", sock);
        return -1;
    }
    strcpy(sock_path, sock);
    roles = g_hash_table_new(g_int64_hash, g_int64_equal);
    if (!parse_sites(sites, err, sizeof(err))) {
        fprintf(stderr, "cr3watch: %s\n", err);
        return -1;
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, sock_path);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0) {
        fprintf(stderr, "cr3watch: cannot listen on %s: %s\n", sock_path, strerror(errno));
        return -1;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, control, (void *)(intptr_t)lfd) != 0) {
        fprintf(stderr, "cr3watch: cannot start its control thread\n");
        return -1;
    }
    pthread_detach(t);
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_idle_cb(id, on_vcpu_idle);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    return 0;
}

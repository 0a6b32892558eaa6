/*
 * loadgen: the TURN load generator (and its plain-forwarder baseline) for bench/run.py.
 *
 * Built at benchmark time with the system compiler:
 *     cc -O2 -o bench/build/loadgen loadgen.c -lssl -lcrypto
 * Loopback only: every socket binds 127.0.0.1 and every run is bounded by --max-time.
 *
 * Modes (one JSON object per result line on stdout, diagnostics on stderr):
 *
 *   relay    Allocate N allocations (401, then long-term credentials with the key given in
 *            hex), ChannelBind (or CreatePermission for --kind send) towards an echo peer
 *            socket owned by this process, then drive traffic client -> relay -> peer ->
 *            (echo) -> relay -> client.  --rate 0: closed loop with --window packets in
 *            flight per allocation (saturation); --rate R: R packets/s paced, for RTT.
 *            Reports packets relayed per second (both directions) and the server's CPU
 *            seconds over the measurement window (read from /proc/PID/stat).
 *   binding  Binding requests from --sockets sockets, --window in flight each (UDP only).
 *   alloc    --inflight sessions each cycling: Allocate -> 401 -> authenticated Allocate
 *            -> Refresh(LIFETIME=0); counts authenticated Allocates per second.  Over TCP
 *            and TLS every cycle is a new connection (and a full TLS handshake).
 *   hold     Allocate --allocs allocations (with a channel each), print "held", wait for a
 *            line on stdin, release them all with Refresh(LIFETIME=0), print "released".
 *   stub     The plain forwarder: a minimal, unauthenticated TURN-shaped relay in C (no
 *            HMAC checks, no lifetimes): over UDP with recvmmsg/sendmmsg batching and UDP
 *            GSO; over TCP and TLS one write per wake-up to each connection.  Running the
 *            generator against it shows how fast the generator can go.
 *            Prints "port N" and serves until stdin closes or --max-time passes.
 *
 * --transport udp|tcp|tls picks the client transport (the peer leg stays UDP, as in the
 * servers); --tls-version 1.2|1.3 pins the TLS version (default 1.3).  Over TCP and TLS
 * each session is one connection from its own 127.x address, and frames are delimited
 * as RFC 8656 says for streams (ChannelData padded to a multiple of 4 bytes).
 *
 * HMAC-SHA1 (MESSAGE-INTEGRITY) is implemented here; OpenSSL is used for TLS only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/udp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define COOKIE 0x2112A442u
#define BATCH 64
#define PKT 2048
#define HEADROOM 36 /* STUN header + XOR-PEER-ADDRESS + DATA header, for the stub */
#define PAYLOAD_MAGIC 0x50545242u /* "PTRB" */

/* STUN message types */
#define T_BINDING 0x0001
#define T_BINDING_OK 0x0101
#define T_ALLOCATE 0x0003
#define T_REFRESH 0x0004
#define T_SEND_IND 0x0016
#define T_DATA_IND 0x0017
#define T_CREATE_PERM 0x0008
#define T_CHANNEL_BIND 0x0009
/* attributes */
#define A_XOR_MAPPED 0x0020
#define A_USERNAME 0x0006
#define A_MI 0x0008
#define A_ERROR_CODE 0x0009
#define A_CHANNEL_NUMBER 0x000C
#define A_LIFETIME 0x000D
#define A_XOR_PEER 0x0012
#define A_DATA 0x0013
#define A_REALM 0x0014
#define A_NONCE 0x0015
#define A_XOR_RELAYED 0x0016
#define A_REQ_TRANSPORT 0x0019

#define CHANNEL 0x4000

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* xorshift64*: transaction ids need to be unique, not unpredictable, in a benchmark */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static void new_txid(uint8_t *t) {
    uint64_t a = rnd(), b = rnd();
    memcpy(t, &a, 8); memcpy(t + 8, &b, 4);
}

/* ---------------------------------------------------------------- SHA-1 and HMAC */

typedef struct { uint32_t h[5]; uint64_t len; uint8_t buf[64]; size_t n; } sha1_ctx;

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++) w[i] = get32(p + 4 * i);
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d; d = c; c = rol(b, 30); b = a; a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1_init(sha1_ctx *c) {
    static const uint32_t iv[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(c->h, iv, sizeof iv); c->len = 0; c->n = 0;
}

static void sha1_update(sha1_ctx *c, const uint8_t *p, size_t n) {
    c->len += n;
    while (n) {
        size_t take = 64 - c->n < n ? 64 - c->n : n;
        memcpy(c->buf + c->n, p, take);
        c->n += take; p += take; n -= take;
        if (c->n == 64) { sha1_block(c->h, c->buf); c->n = 0; }
    }
}

static void sha1_final(sha1_ctx *c, uint8_t out[20]) {
    uint64_t bits = c->len * 8;
    uint8_t pad = 0x80, zero = 0, lenb[8];
    sha1_update(c, &pad, 1);
    while (c->n != 56) sha1_update(c, &zero, 1);
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(c, lenb, 8);
    for (int i = 0; i < 5; i++) put32(out + 4 * i, c->h[i]);
}

static void hmac_sha1(const uint8_t *key, size_t klen, const uint8_t *msg, size_t mlen,
                      uint8_t out[20]) {
    uint8_t k[64] = {0}, pad[64], inner[20];
    sha1_ctx c;
    if (klen > 64) { sha1_init(&c); sha1_update(&c, key, klen); sha1_final(&c, k); }
    else memcpy(k, key, klen);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sha1_init(&c); sha1_update(&c, pad, 64); sha1_update(&c, msg, mlen); sha1_final(&c, inner);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sha1_init(&c); sha1_update(&c, pad, 64); sha1_update(&c, inner, 20); sha1_final(&c, out);
}

static void self_test(void) {
    /* RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?" */
    static const uint8_t want[20] = {0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74,
                                     0x16, 0xd5, 0xf1, 0x84, 0xdf, 0x9c, 0x25, 0x9a, 0x7c, 0x79};
    uint8_t got[20];
    const char *m = "what do ya want for nothing?";
    hmac_sha1((const uint8_t *)"Jefe", 4, (const uint8_t *)m, strlen(m), got);
    if (memcmp(got, want, 20) != 0) { fprintf(stderr, "loadgen: HMAC-SHA1 self-test failed\n"); exit(2); }
}

/* ---------------------------------------------------------------- STUN messages */

typedef struct { uint8_t b[1600]; int len; } msg_t;

static void m_init(msg_t *m, uint16_t type, const uint8_t *txid) {
    put16(m->b, type); put16(m->b + 2, 0); put32(m->b + 4, COOKIE);
    memcpy(m->b + 8, txid, 12);
    m->len = 20;
}

static void m_attr(msg_t *m, uint16_t type, const void *v, int len) {
    uint8_t *p = m->b + m->len;
    put16(p, type); put16(p + 2, (uint16_t)len);
    memcpy(p + 4, v, (size_t)len);
    int padded = (len + 3) & ~3;
    memset(p + 4 + len, 0, (size_t)(padded - len));
    m->len += 4 + padded;
    put16(m->b + 2, (uint16_t)(m->len - 20));
}

static void xor_addr(uint8_t out[8], const struct sockaddr_in *a) {
    out[0] = 0; out[1] = 1;
    put16(out + 2, (uint16_t)(ntohs(a->sin_port) ^ (COOKIE >> 16)));
    put32(out + 4, ntohl(a->sin_addr.s_addr) ^ COOKIE);
}

static void m_xor_addr(msg_t *m, uint16_t type, const struct sockaddr_in *a) {
    uint8_t v[8];
    xor_addr(v, a);
    m_attr(m, type, v, 8);
}

static void m_u32(msg_t *m, uint16_t type, uint32_t value) {
    uint8_t v[4];
    put32(v, value);
    m_attr(m, type, v, 4);
}

static void m_integrity(msg_t *m, const uint8_t key[16]) {
    uint8_t mac[20];
    put16(m->b + 2, (uint16_t)(m->len - 20 + 24));
    hmac_sha1(key, 16, m->b, (size_t)m->len, mac);
    m_attr(m, A_MI, mac, 20);
}

/* Parsed response: only what the generator needs. */
typedef struct {
    uint16_t type;
    int code;
    const uint8_t *realm, *nonce;
    int realm_len, nonce_len;
    int has_relayed, has_mi, has_lifetime;
    uint32_t lifetime;
    struct sockaddr_in relayed, peer;
    int has_peer, channel;
    const uint8_t *data;
    int data_len;
} parsed_t;

static int parse(const uint8_t *b, int n, parsed_t *r) {
    memset(r, 0, sizeof *r);
    r->channel = -1;
    if (n < 20 || (b[0] & 0xC0) || get32(b + 4) != COOKIE) return -1;
    int len = get16(b + 2);
    if (20 + len > n) return -1;
    r->type = get16(b);
    const uint8_t *p = b + 20, *end = b + 20 + len;
    while (end - p >= 4) {
        int t = get16(p), l = get16(p + 2);
        const uint8_t *v = p + 4;
        if (v + l > end) return -1;
        switch (t) {
        case A_ERROR_CODE: if (l >= 4) r->code = (v[2] & 7) * 100 + v[3]; break;
        case A_REALM: r->realm = v; r->realm_len = l; break;
        case A_NONCE: r->nonce = v; r->nonce_len = l; break;
        case A_MI: r->has_mi = 1; break;
        case A_LIFETIME: if (l == 4) { r->has_lifetime = 1; r->lifetime = get32(v); } break;
        case A_CHANNEL_NUMBER: if (l == 4) r->channel = get16(v); break;
        case A_DATA: r->data = v; r->data_len = l; break;
        case A_XOR_RELAYED:
        case A_XOR_PEER:
            if (l == 8 && v[1] == 1) {
                struct sockaddr_in *a = t == A_XOR_RELAYED ? &r->relayed : &r->peer;
                a->sin_family = AF_INET;
                a->sin_port = htons((uint16_t)(get16(v + 2) ^ (COOKIE >> 16)));
                a->sin_addr.s_addr = htonl(get32(v + 4) ^ COOKIE);
                if (t == A_XOR_RELAYED) r->has_relayed = 1; else r->has_peer = 1;
            }
            break;
        default: break;
        }
        p = v + ((l + 3) & ~3);
    }
    return 0;
}

/* ---------------------------------------------------------------- options */

static struct {
    const char *mode;
    struct sockaddr_in server, listen;
    char user[128];
    uint8_t key[16];
    int have_key;
    int allocs, payload, send_kind, window, sockets, inflight;
    double rate, warmup, duration, max_time, rto;
    char server_pids[256];
    int server_core, gen_core, gso;
    uint64_t max_packets; /* every run is bounded in count as well as in time */
    int transport, tls_version; /* TR_*; TLS1_2_VERSION or TLS1_3_VERSION */
    const char *cert, *pkey;    /* the stub's TLS certificate and private key */
} cfg;

enum { TR_UDP, TR_TCP, TR_TLS };
static const char *const transport_names[] = {"udp", "tcp", "tls"};

static void parse_addr(const char *s, struct sockaddr_in *a) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) { fprintf(stderr, "bad address %s\n", s); exit(2); }
    memcpy(host, s, (size_t)(colon - s)); host[colon - s] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) { fprintf(stderr, "bad address %s\n", s); exit(2); }
    /* Workplace rule: loopback only. */
    if ((ntohl(a->sin_addr.s_addr) >> 24) != 127) { fprintf(stderr, "loadgen: loopback only\n"); exit(2); }
}

static void parse_key(const char *hex) {
    if (strlen(hex) != 32) { fprintf(stderr, "--key wants 32 hex digits\n"); exit(2); }
    for (int i = 0; i < 16; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) { fprintf(stderr, "bad --key\n"); exit(2); }
        cfg.key[i] = (uint8_t)v;
    }
    cfg.have_key = 1;
}

static void parse_args(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen relay|binding|alloc|hold|stub [--options]\n");
        exit(2);
    }
    cfg.mode = argv[1];
    cfg.allocs = 10; cfg.payload = 100; cfg.window = 16; cfg.sockets = 8; cfg.inflight = 64;
    cfg.server_core = 0; cfg.gen_core = 1; cfg.gso = 1; cfg.max_packets = 200000000ull;
    cfg.warmup = 1.0; cfg.duration = 4.0; cfg.max_time = 30.0; cfg.rto = 0.5;
    cfg.transport = TR_UDP; cfg.tls_version = TLS1_3_VERSION;
    parse_addr("127.0.0.1:0", &cfg.listen);
    snprintf(cfg.user, sizeof cfg.user, "bench");
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "option %s needs a value\n", o); exit(2); }
        i++;
        if (!strcmp(o, "--server")) parse_addr(v, &cfg.server);
        else if (!strcmp(o, "--listen")) parse_addr(v, &cfg.listen);
        else if (!strcmp(o, "--user")) snprintf(cfg.user, sizeof cfg.user, "%s", v);
        else if (!strcmp(o, "--key")) parse_key(v);
        else if (!strcmp(o, "--allocs")) cfg.allocs = atoi(v);
        else if (!strcmp(o, "--payload")) cfg.payload = atoi(v);
        else if (!strcmp(o, "--kind")) cfg.send_kind = !strcmp(v, "send");
        else if (!strcmp(o, "--window")) cfg.window = atoi(v);
        else if (!strcmp(o, "--sockets")) cfg.sockets = atoi(v);
        else if (!strcmp(o, "--inflight")) cfg.inflight = atoi(v);
        else if (!strcmp(o, "--rate")) cfg.rate = atof(v);
        else if (!strcmp(o, "--warmup")) cfg.warmup = atof(v);
        else if (!strcmp(o, "--duration")) cfg.duration = atof(v);
        else if (!strcmp(o, "--max-time")) cfg.max_time = atof(v);
        else if (!strcmp(o, "--server-pid")) snprintf(cfg.server_pids, sizeof cfg.server_pids, "%s", v);
        else if (!strcmp(o, "--server-core")) cfg.server_core = atoi(v);
        else if (!strcmp(o, "--gen-core")) cfg.gen_core = atoi(v);
        else if (!strcmp(o, "--gso")) cfg.gso = atoi(v);
        else if (!strcmp(o, "--max-packets")) cfg.max_packets = strtoull(v, NULL, 10);
        else if (!strcmp(o, "--transport")) {
            if (!strcmp(v, "udp")) cfg.transport = TR_UDP;
            else if (!strcmp(v, "tcp")) cfg.transport = TR_TCP;
            else if (!strcmp(v, "tls")) cfg.transport = TR_TLS;
            else { fprintf(stderr, "--transport is udp, tcp or tls\n"); exit(2); }
        } else if (!strcmp(o, "--tls-version")) {
            if (!strcmp(v, "1.2")) cfg.tls_version = TLS1_2_VERSION;
            else if (!strcmp(v, "1.3")) cfg.tls_version = TLS1_3_VERSION;
            else { fprintf(stderr, "--tls-version is 1.2 or 1.3\n"); exit(2); }
        }
        /* --key is the long-term key in hex already: the stub's private key is --pkey */
        else if (!strcmp(o, "--cert")) cfg.cert = v;
        else if (!strcmp(o, "--pkey")) cfg.pkey = v;
        else { fprintf(stderr, "unknown option %s\n", o); exit(2); }
    }
    if (cfg.payload < 24) cfg.payload = 24;
    if (cfg.payload > 1400) cfg.payload = 1400;
    if (cfg.duration > 60) cfg.duration = 60;
    if (cfg.max_time > 300) cfg.max_time = 300;
}

/* CPU time (user + system, all threads) of one process in seconds, or -1. */
static double pid_cpu(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long ut = 0, st = 0;
    /* fields after the command: state(3) ... utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* The server's CPU time: the sum over --server-pid (a comma list, e.g. a supervisor and
 * its workers), or -1 when it cannot be read. */
static double server_cpu(void) {
    if (!cfg.server_pids[0]) return -1;
    double total = 0;
    for (const char *p = cfg.server_pids; *p;) {
        int pid = atoi(p);
        double t = pid > 0 ? pid_cpu(pid) : -1;
        if (t < 0) return -1;
        total += t;
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    return total;
}

/* This process's CPU time in seconds (user + system). */
static double self_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Busy and total ticks of one CPU from /proc/stat, to tell how much of a core went to
 * processes other than the server and the generator (the machine may be shared). */
typedef struct { double busy, total; } cpu_ticks;

static cpu_ticks core_ticks(int cpu) {
    cpu_ticks t = {0, 0};
    char line[512], name[16];
    snprintf(name, sizeof name, "cpu%d ", cpu);
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return t;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, strlen(name)) != 0) continue;
        unsigned long long v[8] = {0};
        sscanf(line + strlen(name), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
               &v[3], &v[4], &v[5], &v[6], &v[7]);
        t.busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
        t.total = t.busy + (double)(v[3] + v[4]);
        break;
    }
    fclose(f);
    double hz = (double)sysconf(_SC_CLK_TCK);
    t.busy /= hz; t.total /= hz;
    return t;
}

/* Time the generator spent spinning with nothing to receive and nothing to send: it
 * busy-polls, so its CPU use is always ~100%; this is its real headroom. */
static struct { double sum, last; int was_idle, on; } idle;

static void idle_top(double now) {
    if (idle.on && idle.was_idle) idle.sum += now - idle.last;
    idle.last = now;
}

static void idle_start(void) { idle.on = 1; idle.sum = 0; }

/* Snapshot of everything the measurement window reports about CPU use. */
typedef struct { double t, server, self; cpu_ticks scpu, gcpu; } cpu_snap;

static cpu_snap snap(void);

static void print_cpu(const cpu_snap *a, const cpu_snap *b);

static void big_buffers(int fd) {
    int size = 4 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

static int udp_socket(const struct sockaddr_in *bind_to, const struct sockaddr_in *connect_to) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in local = *bind_to;
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind");
    if (connect_to && connect(fd, (const struct sockaddr *)connect_to, sizeof *connect_to) < 0)
        die("connect");
    return fd;
}

static struct sockaddr_in local_addr(int fd) {
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    return a;
}

static cpu_snap snap(void) {
    cpu_snap s;
    s.t = now_s(); s.server = server_cpu(); s.self = self_cpu();
    s.scpu = core_ticks(cfg.server_core); s.gcpu = core_ticks(cfg.gen_core);
    return s;
}

/* ,"server_cpu_s":..,"server_cpu_util":..,"gen_cpu_util":..,"foreign_server_core":..,... */
static void print_cpu(const cpu_snap *a, const cpu_snap *b) {
    double secs = b->t - a->t;
    double server = a->server >= 0 && b->server >= 0 ? b->server - a->server : -1;
    double self = b->self - a->self;
    double s_busy = b->scpu.busy - a->scpu.busy, g_busy = b->gcpu.busy - a->gcpu.busy;
    /* what the two cores spent on anything but the server (server core) or us (ours) */
    double foreign_s = server >= 0 ? s_busy - server : -1, foreign_g = g_busy - self;
    printf(",\"server_cpu_s\":%.3f,\"server_cpu_util\":%.3f,\"gen_cpu_util\":%.3f,"
           "\"foreign_server_core\":%.3f,\"foreign_gen_core\":%.3f,\"gen_idle\":%.3f",
           server, server >= 0 ? server / secs : -1, self / secs,
           foreign_s >= 0 ? foreign_s / secs : 0, foreign_g >= 0 ? foreign_g / secs : 0,
           idle.sum / secs);
}

/* ---------------------------------------------------------------- streams (TCP and TLS) */

static int epfd;

/* A frame's bytes are at most 4 + 65535 (+3 padding) in principle; the servers and the
 * generator send a few KB at most, and a frame that does not fit is a broken stream. */
#define IN_CAP 32768
#define OUT_MAX (4 << 20) /* past this the peer is not reading: drop, as UDP would */

enum { P_CLOSED, P_CONNECTING, P_HANDSHAKE, P_OPEN };

/* One TCP or TLS connection with its receive buffer (partial frames wait there) and its
 * send buffer (what the kernel did not take yet, written on EPOLLOUT). */
typedef struct {
    int fd, phase;
    SSL *ssl;
    uint32_t id, watching;  /* epoll data, and the events epoll watches now */
    int handshake_writes;   /* the TLS handshake waits to write, not to read */
    int write_wants_read;   /* SSL_write must wait for the socket to be readable */
    unsigned gen;           /* bumped on close: a frame handler may close its own stream */
    uint8_t *in;
    int in_len;
    uint8_t *out;
    size_t out_off, out_len, out_cap;
} stream_t;

static SSL_CTX *tls_ctx;
static char tls_version[32], tls_cipher[96]; /* what the first handshake negotiated */
static char tls_error[160];                  /* why the first failed handshake failed */

static size_t stream_pending(const stream_t *t) { return t->out_len - t->out_off; }

/* Level-triggered epoll: EPOLLOUT only while there is something to write, or else every
 * wait would return at once. */
static void stream_watch(stream_t *t) {
    if (t->fd < 0) return;
    uint32_t want = EPOLLIN;
    if (t->phase == P_CONNECTING || (t->phase == P_HANDSHAKE && t->handshake_writes) ||
        (t->phase == P_OPEN && stream_pending(t) && !t->write_wants_read))
        want |= EPOLLOUT;
    if (want == t->watching) return;
    struct epoll_event ev = {.events = want, .data.u32 = t->id};
    if (epoll_ctl(epfd, t->watching ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, t->fd, &ev) < 0)
        die("epoll_ctl(stream)");
    t->watching = want;
}

/* Room for n more bytes at the end of the send buffer, or NULL past OUT_MAX.  Moving
 * what waits to the front is allowed while an SSL_write waits to be retried
 * (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER): the retry passes the same bytes, and more. */
static uint8_t *stream_reserve(stream_t *t, size_t n) {
    if (t->out_len + n > t->out_cap && t->out_off) {
        memmove(t->out, t->out + t->out_off, stream_pending(t));
        t->out_len -= t->out_off;
        t->out_off = 0;
    }
    if (t->out_len + n > t->out_cap) {
        size_t cap = t->out_cap ? t->out_cap : 4096;
        while (cap < t->out_len + n) cap *= 2;
        if (cap > OUT_MAX) return NULL;
        uint8_t *out = realloc(t->out, cap);
        if (!out) die("realloc");
        t->out = out;
        t->out_cap = cap;
    }
    uint8_t *p = t->out + t->out_len;
    t->out_len += n;
    return p;
}

/* Write what the kernel takes now; the rest waits for EPOLLOUT.  -1: the connection is
 * gone. */
static int stream_flush(stream_t *t) {
    if (t->phase != P_OPEN) return 0;
    t->write_wants_read = 0;
    while (stream_pending(t)) {
        size_t left = stream_pending(t);
        if (t->ssl) {
            ERR_clear_error();
            int n = SSL_write(t->ssl, t->out + t->out_off, left > INT_MAX ? INT_MAX : (int)left);
            if (n <= 0) {
                int e = SSL_get_error(t->ssl, n);
                if (e == SSL_ERROR_WANT_WRITE) break;
                if (e == SSL_ERROR_WANT_READ) { t->write_wants_read = 1; break; }
                return -1;
            }
            t->out_off += (size_t)n;
        } else {
            ssize_t n = send(t->fd, t->out + t->out_off, left, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                return -1;
            }
            t->out_off += (size_t)n;
        }
    }
    if (!stream_pending(t)) t->out_off = t->out_len = 0;
    stream_watch(t);
    return 0;
}

/* Queue one message and write it (with anything still waiting). */
static int stream_queue(stream_t *t, const void *b, size_t n) {
    uint8_t *p = stream_reserve(t, n);
    if (!p) return 0; /* dropped */
    memcpy(p, b, n);
    return stream_flush(t);
}

/* Drive a nonblocking TLS handshake: 1 done, 0 waiting for the socket, -1 failed. */
static int stream_handshake(stream_t *t) {
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r == 1) {
        t->phase = P_OPEN;
        if (!tls_version[0]) {
            snprintf(tls_version, sizeof tls_version, "%s", SSL_get_version(t->ssl));
            snprintf(tls_cipher, sizeof tls_cipher, "%s", SSL_get_cipher_name(t->ssl));
        }
        stream_watch(t);
        return 1;
    }
    int e = SSL_get_error(t->ssl, r);
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
        if (!tls_error[0]) {
            unsigned long code = ERR_peek_last_error();
            if (code) ERR_error_string_n(code, tls_error, sizeof tls_error);
            else snprintf(tls_error, sizeof tls_error, "connection closed during the handshake");
        }
        return -1;
    }
    t->handshake_writes = e == SSL_ERROR_WANT_WRITE;
    stream_watch(t);
    return 0;
}

/* Bytes of the frame at the head of a stream: STUN is 20 + length, ChannelData 4 +
 * length padded to 4 (RFC 8656 §12.5).  0: not all of the header is there yet; -1: no
 * frame starts with this byte. */
static int frame_size(const uint8_t *b, int n) {
    if (n < 4) return 0;
    int len = get16(b + 2);
    if (b[0] >= 0x40 && b[0] <= 0x7F) return 4 + ((len + 3) & ~3);
    if ((b[0] & 0xC0) == 0) return 20 + len;
    return -1;
}

typedef void (*frame_fn)(void *ctx, const uint8_t *b, int n);

/* Read what has arrived and hand every whole frame to `frame`; `chunk_done` (if any)
 * runs after each read's frames, while the pointers given to `frame` are still good.
 * Returns 0 when the socket has no more for now, 1 when a handler closed the stream,
 * -1 when the connection ended or broke. */
static int stream_read(stream_t *t, frame_fn frame, void (*chunk_done)(void *), void *ctx) {
    unsigned gen = t->gen;
    if (!t->in && !(t->in = malloc(IN_CAP))) die("malloc");
    for (;;) {
        int want = IN_CAP - t->in_len, n;
        if (t->ssl) {
            ERR_clear_error();
            n = SSL_read(t->ssl, t->in + t->in_len, want);
            if (n <= 0) {
                int e = SSL_get_error(t->ssl, n);
                return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? 0 : -1;
            }
        } else {
            ssize_t r = recv(t->fd, t->in + t->in_len, (size_t)want, 0);
            if (r == 0) return -1;
            if (r < 0) return errno == EAGAIN || errno == EINTR ? 0 : -1;
            n = (int)r;
        }
        t->in_len += n;
        int off = 0;
        for (;;) {
            int size = frame_size(t->in + off, t->in_len - off);
            if (size < 0) return -1;
            if (size == 0 || size > t->in_len - off) break;
            frame(ctx, t->in + off, size);
            if (t->gen != gen) return 1;
            off += size;
        }
        if (chunk_done) chunk_done(ctx);
        if (t->gen != gen) return 1;
        if (off) memmove(t->in, t->in + off, (size_t)(t->in_len - off));
        t->in_len -= off;
        if (t->in_len == IN_CAP) return -1; /* a frame larger than any we use */
        /* TCP: a short read emptied the socket, and epoll says when there is more.  TLS
         * may hold decrypted bytes that epoll does not see: read until it wants more. */
        if (!t->ssl && n < want) return 0;
    }
}

/* Close the connection (a TLS close_notify first, best effort); the buffers stay for
 * the next connection of the same session. */
static void stream_close(stream_t *t) {
    if (t->ssl) {
        SSL_shutdown(t->ssl);
        SSL_free(t->ssl);
        t->ssl = NULL;
    }
    if (t->fd >= 0) close(t->fd); /* which also takes it out of the epoll set */
    t->fd = -1;
    t->phase = P_CLOSED;
    t->watching = 0;
    t->handshake_writes = t->write_wants_read = 0;
    t->in_len = 0;
    t->out_off = t->out_len = 0;
    t->gen++;
}

static void tcp_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* The client side: no certificate checks (a self-signed loopback certificate) and no
 * session cache, so that every connection makes a full handshake, as a browser's first
 * connection to a TURN server does. */
static void tls_client_init(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) { fprintf(stderr, "loadgen: SSL_CTX_new failed\n"); exit(2); }
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
    /* pinned both ways, so that a figure is for the version it says */
    SSL_CTX_set_min_proto_version(tls_ctx, cfg.tls_version);
    SSL_CTX_set_max_proto_version(tls_ctx, cfg.tls_version);
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
}

/* ,"transport":"tls","tls_version":"TLSv1.3","cipher":"..." */
static void print_transport(void) {
    printf(",\"transport\":\"%s\"", transport_names[cfg.transport]);
    if (cfg.transport == TR_TLS) printf(",\"tls_version\":\"%s\",\"cipher\":\"%s\"", tls_version, tls_cipher);
    if (tls_error[0]) printf(",\"tls_error\":\"%s\"", tls_error); /* OpenSSL's text has no quotes */
}

/* ---------------------------------------------------------------- client sessions */

enum { S_IDLE, S_ALLOC0, S_ALLOC1, S_PERM, S_CHBIND, S_READY, S_REFRESH0, S_DONE, S_FAILED };

typedef struct {
    int fd, state, tries; /* fd: the UDP socket; over TCP and TLS st.fd */
    stream_t st;
    double sent_at;
    uint8_t txid[12];
    uint8_t realm[256], nonce[256];
    int realm_len, nonce_len;
    msg_t req; /* last request, for retransmission */
    struct sockaddr_in relayed;
    /* data plane */
    uint64_t tx, rx, seq, acked; /* acked: 1 + highest sequence number echoed back */
    int64_t outstanding;
    double last_progress;
} sess_t;

static sess_t *sessions;
static int nsessions;
static struct sockaddr_in peer_addr;
static int peer_fd = -1;
static int after_alloc_state = S_READY; /* what an Allocate success leads to */
static int cycle_allocs;                /* alloc mode: go straight to Refresh 0 */

static struct {
    uint64_t alloc_ok, cycles, errors, timeouts, failed, stale;
    uint64_t connects, lost; /* TCP/TLS: connections made, and ended by the server or broken */
    int last_error;
} cp; /* control-plane counters */

static int measuring_cp;
static uint64_t cp_alloc_ok_at_start, cp_cycles_at_start;

static void renew_socket(sess_t *s);
static void stream_connect(sess_t *s);
static void s_lost(sess_t *s);

static void s_send(sess_t *s) {
    s->sent_at = now_s();
    if (cfg.transport != TR_UDP) {
        /* a session connects when it has something to say: alloc and hold start sessions
         * --inflight at a time, and so do their connections and handshakes */
        if (s->st.phase == P_CLOSED) stream_connect(s);
        if (stream_queue(&s->st, s->req.b, (size_t)s->req.len) < 0) s_lost(s);
        return;
    }
    if (send(s->fd, s->req.b, (size_t)s->req.len, 0) < 0 && errno != EAGAIN && errno != ECONNREFUSED)
        die("send");
}

static void add_auth(sess_t *s) {
    m_attr(&s->req, A_USERNAME, cfg.user, (int)strlen(cfg.user));
    m_attr(&s->req, A_REALM, s->realm, s->realm_len);
    m_attr(&s->req, A_NONCE, s->nonce, s->nonce_len);
    m_integrity(&s->req, cfg.key);
}

static void s_request(sess_t *s, int state) {
    uint8_t rt[4] = {17, 0, 0, 0};
    new_txid(s->txid);
    s->state = state;
    s->tries = 0;
    switch (state) {
    case S_ALLOC0:
        m_init(&s->req, T_ALLOCATE, s->txid);
        m_attr(&s->req, A_REQ_TRANSPORT, rt, 4);
        break;
    case S_ALLOC1:
        m_init(&s->req, T_ALLOCATE, s->txid);
        m_attr(&s->req, A_REQ_TRANSPORT, rt, 4);
        add_auth(s);
        break;
    case S_PERM:
        m_init(&s->req, T_CREATE_PERM, s->txid);
        m_xor_addr(&s->req, A_XOR_PEER, &peer_addr);
        add_auth(s);
        break;
    case S_CHBIND:
        m_init(&s->req, T_CHANNEL_BIND, s->txid);
        m_u32(&s->req, A_CHANNEL_NUMBER, (uint32_t)CHANNEL << 16);
        m_xor_addr(&s->req, A_XOR_PEER, &peer_addr);
        add_auth(s);
        break;
    case S_REFRESH0:
        m_init(&s->req, T_REFRESH, s->txid);
        m_u32(&s->req, A_LIFETIME, 0);
        add_auth(s);
        break;
    default:
        return;
    }
    s_send(s);
}

static void s_fail(sess_t *s, int code) {
    cp.errors++;
    cp.last_error = code;
    if (cycle_allocs) { s->state = S_IDLE; renew_socket(s); return; } /* start over */
    s->state = S_FAILED;
    cp.failed++;
    if (cfg.transport != TR_UDP) stream_close(&s->st);
}

/* One control-plane response for session s. */
static void s_response(sess_t *s, const uint8_t *b, int n) {
    parsed_t r;
    if (parse(b, n, &r) < 0 || memcmp(b + 8, s->txid, 12) != 0) return;
    int success = (r.type & 0x0110) == 0x0100, error = (r.type & 0x0110) == 0x0110;
    if (!success && !error) return;
    if (error && (r.code == 401 || r.code == 438) && r.nonce) {
        if (r.realm && r.realm_len < 256) { memcpy(s->realm, r.realm, (size_t)r.realm_len); s->realm_len = r.realm_len; }
        if (r.nonce_len < 256) { memcpy(s->nonce, r.nonce, (size_t)r.nonce_len); s->nonce_len = r.nonce_len; }
        if (s->state == S_ALLOC0) { s_request(s, S_ALLOC1); return; }
        if (r.code == 438 && s->state != S_READY && s->state != S_DONE) {
            cp.stale++;
            s_request(s, s->state); /* same request, fresh nonce */
            return;
        }
        s_fail(s, r.code);
        return;
    }
    switch (s->state) {
    case S_ALLOC0:
    case S_ALLOC1:
        if (!success) { s_fail(s, r.code); return; }
        s->relayed = r.relayed;
        cp.alloc_ok++;
        if (cycle_allocs) s_request(s, S_REFRESH0);
        else if (after_alloc_state == S_READY) s->state = S_READY;
        else s_request(s, after_alloc_state);
        return;
    case S_PERM:
    case S_CHBIND:
        if (!success) { s_fail(s, r.code); return; }
        s->state = S_READY;
        return;
    case S_REFRESH0:
        if (!success && r.code != 437) { s_fail(s, r.code); return; }
        cp.cycles++;
        s->state = cycle_allocs ? S_IDLE : S_DONE;
        /* coturn answers 437 to an Allocate on a 5-tuple it has just released, so each
         * cycle starts from a new client port, as a new browser session would. */
        if (cycle_allocs) renew_socket(s);
        return;
    default:
        return;
    }
}

static int waiting(int state) {
    return state == S_ALLOC0 || state == S_ALLOC1 || state == S_PERM || state == S_CHBIND ||
           state == S_REFRESH0;
}

/* Over TCP and TLS nothing is retransmitted (the stream is reliable): a request that
 * has no answer after this many RTOs (connecting and the handshake included) failed. */
#define STREAM_TIMEOUT_RTOS 10

static void check_timeouts(double now) {
    for (int i = 0; i < nsessions; i++) {
        sess_t *s = &sessions[i];
        if (cfg.transport != TR_UDP) {
            if (!waiting(s->state) || now - s->sent_at < cfg.rto * STREAM_TIMEOUT_RTOS) continue;
            cp.timeouts++;
            s_fail(s, 0); /* closes the connection; a cycling session reconnects */
            continue;
        }
        if (!waiting(s->state) || now - s->sent_at < cfg.rto) continue;
        cp.timeouts++;
        if (++s->tries > 6) { s_fail(s, 0); continue; }
        s_send(s); /* retransmit with the same transaction id */
    }
}

static void sess_stream_event(sess_t *s, uint32_t events, frame_fn frame);

static void control_frame(void *ctx, const uint8_t *b, int n) { s_response(ctx, b, n); }

static void drain_control(sess_t *s, uint32_t events) {
    if (cfg.transport != TR_UDP) { sess_stream_event(s, events, control_frame); return; }
    uint8_t buf[PKT];
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, 0);
        if (n < 0) return;
        s_response(s, buf, (int)n);
    }
}

/* A new client address for every session and every Allocate cycle: servers (coturn)
 * answer 437 for a while to an Allocate from a 5-tuple they have just released, and a
 * real client gets a new port per session anyway.  All of 127.0.0.0/8 is loopback. */
static uint32_t next_client_ip;

static struct sockaddr_in client_addr(void) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    uint32_t n = next_client_ip++ % (235u << 16);
    a.sin_addr.s_addr = htonl((127u << 24) | ((16u + (n >> 16)) << 16) | (n & 0xFFFF));
    if ((n & 0xFF) == 0 || (n & 0xFF) == 255) return client_addr(); /* skip .0 and .255 */
    return a;
}

static void renew_socket(sess_t *s) {
    if (cfg.transport != TR_UDP) { stream_close(&s->st); return; } /* s_send reconnects */
    struct sockaddr_in any = client_addr();
    int fd = udp_socket(&any, &cfg.server);
    /* dup2 keeps the descriptor number, so the epoll registration (index) stays valid */
    if (dup2(fd, s->fd) < 0) die("dup2");
    close(fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(s - sessions)};
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl(renew)");
}

/* A new connection from a new client address, TCP_NODELAY (a request or a burst is one
 * write, and waits for nothing), nonblocking: sess_stream_event sees it through. */
static void stream_connect(sess_t *s) {
    struct sockaddr_in from = client_addr();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket(tcp)");
    tcp_nodelay(fd);
    if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0) die("bind(tcp)");
    if (connect(fd, (const struct sockaddr *)&cfg.server, sizeof cfg.server) < 0 && errno != EINPROGRESS)
        die("connect(tcp)");
    s->st.fd = fd;
    s->st.phase = P_CONNECTING;
    stream_watch(&s->st);
}

/* The server closed the connection, or it broke: what was waiting for an answer failed,
 * and an allocation that carried traffic is gone. */
static void s_lost(sess_t *s) {
    cp.lost++;
    stream_close(&s->st);
    if (waiting(s->state)) s_fail(s, -1);
    else if (s->state == S_READY) { s->state = S_FAILED; cp.failed++; }
}

/* One epoll event for a session's connection: finish connecting and the TLS handshake,
 * write what waits, and hand each frame that arrived to `frame`. */
static void sess_stream_event(sess_t *s, uint32_t events, frame_fn frame) {
    stream_t *t = &s->st;
    if (t->phase == P_CLOSED) return;
    if (t->phase == P_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) { s_lost(s); return; }
        if (cfg.transport == TR_TCP) {
            t->phase = P_OPEN;
            cp.connects++;
        } else {
            t->ssl = SSL_new(tls_ctx);
            if (!t->ssl || !SSL_set_fd(t->ssl, t->fd)) { fprintf(stderr, "loadgen: SSL_new failed\n"); exit(2); }
            SSL_set_tlsext_host_name(t->ssl, "localhost");
            SSL_set_connect_state(t->ssl);
            t->phase = P_HANDSHAKE;
        }
    }
    if (t->phase == P_HANDSHAKE) {
        int r = stream_handshake(t);
        if (r < 0) { s_lost(s); return; }
        if (r == 0) return;
        cp.connects++;
    }
    if (stream_pending(t) && stream_flush(t) < 0) { s_lost(s); return; }
    if (t->ssl || (events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
        int r = stream_read(t, frame, NULL, s);
        if (r < 0) { s_lost(s); return; }
        if (r > 0) return; /* a handler closed it (alloc mode: the cycle ended) */
    }
    if (t->write_wants_read && stream_flush(t) < 0) { s_lost(s); return; }
    stream_watch(t);
}

static void open_sessions(int n) {
    nsessions = n;
    sessions = calloc((size_t)n, sizeof *sessions);
    if (!sessions) die("calloc");
    for (int i = 0; i < n; i++) {
        sessions[i].st.fd = sessions[i].fd = -1;
        sessions[i].st.id = (uint32_t)i;
        if (cfg.transport != TR_UDP) continue; /* connected by its first request */
        struct sockaddr_in any = client_addr();
        sessions[i].fd = udp_socket(&any, &cfg.server);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, sessions[i].fd, &ev) < 0) die("epoll_ctl");
    }
}

/* Drive every session from `from` to a final state (READY/DONE/FAILED), `inflight` at a
 * time.  `start` is the state to put an eligible session in.  Returns seconds taken. */
static double run_control(int eligible_state, int start, int inflight, double deadline) {
    double t0 = now_s(), last_check = t0;
    int next = 0;
    struct epoll_event evs[256];
    for (;;) {
        int active = 0, pending = 0;
        for (int i = 0; i < nsessions; i++) {
            if (waiting(sessions[i].state)) active++;
            else if (sessions[i].state == eligible_state) pending++;
        }
        if (!active && !pending) break;
        while (active < inflight && next < nsessions) {
            sess_t *s = &sessions[next++];
            if (s->state != eligible_state) continue;
            if (start == S_ALLOC0) s_request(s, S_ALLOC0);
            else s_request(s, start);
            active++;
        }
        double now = now_s();
        if (now > deadline) { fprintf(stderr, "loadgen: control plane deadline passed\n"); break; }
        int n = epoll_wait(epfd, evs, 256, 5);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id < (uint32_t)nsessions) drain_control(&sessions[id], evs[i].events);
        }
        if (now - last_check > 0.05) { check_timeouts(now); last_check = now; }
    }
    return now_s() - t0;
}

static int count_state(int state) {
    int c = 0;
    for (int i = 0; i < nsessions; i++) c += sessions[i].state == state;
    return c;
}

/* ---------------------------------------------------------------- data plane */

static struct mmsghdr rx_msgs[BATCH], tx_msgs[BATCH];
static struct iovec rx_iov[BATCH], tx_iov[BATCH];
static uint8_t rx_buf[BATCH][PKT], tx_buf[BATCH][PKT];
static struct sockaddr_in rx_names[BATCH];

static void rx_reset(int n) {
    for (int i = 0; i < n; i++) {
        rx_iov[i].iov_base = rx_buf[i]; rx_iov[i].iov_len = PKT;
        rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i]; rx_msgs[i].msg_hdr.msg_iovlen = 1;
        rx_msgs[i].msg_hdr.msg_name = &rx_names[i];
        rx_msgs[i].msg_hdr.msg_namelen = sizeof rx_names[i];
        rx_msgs[i].msg_hdr.msg_control = NULL; rx_msgs[i].msg_hdr.msg_controllen = 0;
    }
}

static struct {
    uint64_t client_tx, client_rx, peer_rx, peer_tx, stalls;
} dp;

static uint64_t *rtt_ns;
static size_t rtt_n, rtt_cap;
static uint64_t rtt_from_ns; /* only packets sent after this count */
static int frame_len, payload_off;

/* Build the client->server frame template in every tx slot; per packet only the
 * payload's session, sequence and timestamp fields change. */
static void build_templates(void) {
    msg_t m;
    if (cfg.send_kind) {
        uint8_t txid[12];
        new_txid(txid);
        m_init(&m, T_SEND_IND, txid);
        m_xor_addr(&m, A_XOR_PEER, &peer_addr);
        uint8_t zeros[1500] = {0};
        m_attr(&m, A_DATA, zeros, cfg.payload);
        frame_len = m.len;
        payload_off = m.len - ((cfg.payload + 3) & ~3);
    } else {
        memset(m.b, 0, sizeof m.b);
        put16(m.b, CHANNEL); put16(m.b + 2, (uint16_t)cfg.payload);
        frame_len = 4 + cfg.payload;
        if (cfg.transport != TR_UDP) frame_len = (frame_len + 3) & ~3; /* padded on streams */
        payload_off = 4;
    }
    for (int i = 0; i < BATCH; i++) {
        memcpy(tx_buf[i], m.b, (size_t)frame_len);
        put32(tx_buf[i] + payload_off, PAYLOAD_MAGIC);
        tx_iov[i].iov_base = tx_buf[i]; tx_iov[i].iov_len = (size_t)frame_len;
        memset(&tx_msgs[i], 0, sizeof tx_msgs[i]);
        tx_msgs[i].msg_hdr.msg_iov = &tx_iov[i]; tx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

/* UDP GSO (Linux 4.18+): the generator hands the kernel up to 64 equal-sized datagrams
 * per send; the server still receives them one datagram at a time.  This roughly halves
 * the generator's cost per packet, which is what keeps it ahead of the servers. */
static int gso_segments = 1; /* datagrams per client send: 1 = no GSO */

static void enable_gso(void) {
    if (!cfg.gso || cfg.transport != TR_UDP) return;
    int max = 65000 / frame_len;
    if (max > BATCH) max = BATCH;
    for (int i = 0; i < nsessions; i++) {
        int size = frame_len;
        if (setsockopt(sessions[i].fd, SOL_UDP, UDP_SEGMENT, &size, sizeof size) < 0) {
            fprintf(stderr, "loadgen: no UDP GSO (%s); sending datagram by datagram\n", strerror(errno));
            cfg.gso = 0;
            return;
        }
    }
    gso_segments = max;
}

/* Over a stream more than this waiting in the send buffer means the server is not
 * keeping up: send nothing until it drains. */
#define STREAM_BACKLOG 65536

/* Over TCP and TLS a burst is one write: the frames one after another in the send buffer,
 * which is what keeps the generator cheaper per packet than the servers. */
static void send_burst_stream(sess_t *s, int k, uint32_t index) {
    stream_t *st = &s->st;
    if (st->phase != P_OPEN || stream_pending(st) > STREAM_BACKLOG) return;
    uint8_t *b = stream_reserve(st, (size_t)k * (size_t)frame_len);
    if (!b) return;
    uint64_t t = now_ns();
    for (int i = 0; i < k; i++) {
        uint8_t *f = b + (size_t)i * (size_t)frame_len, *p = f + payload_off;
        uint64_t seq = s->seq + (uint64_t)i;
        memcpy(f, tx_buf[0], (size_t)frame_len);
        put32(p + 4, index);
        memcpy(p + 8, &seq, 8);
        memcpy(p + 16, &t, 8);
    }
    s->seq += (uint64_t)k;
    s->tx += (uint64_t)k; s->outstanding = (int64_t)(s->seq - s->acked); dp.client_tx += (uint64_t)k;
    if (stream_flush(st) < 0) s_lost(s);
}

static void send_burst(sess_t *s, int k, uint32_t index) {
    if (cfg.transport != TR_UDP) { send_burst_stream(s, k, index); return; }
    uint64_t t = now_ns();
    for (int i = 0; i < k; i++) {
        uint8_t *p = tx_buf[i] + payload_off;
        uint64_t seq = s->seq + (uint64_t)i;
        put32(p + 4, index);
        memcpy(p + 8, &seq, 8);
        memcpy(p + 16, &t, 8);
    }
    int sent;
    if (gso_segments > 1 && k > 1) {
        if (k > gso_segments) k = gso_segments;
        struct msghdr h = {.msg_iov = tx_iov, .msg_iovlen = (size_t)k};
        sent = sendmsg(s->fd, &h, 0) < 0 ? -1 : k;
    } else {
        sent = sendmmsg(s->fd, tx_msgs, (unsigned)k, 0);
    }
    if (sent < 0) {
        if (errno == EAGAIN || errno == ECONNREFUSED || errno == ENOBUFS) return;
        die("sendmmsg");
    }
    s->seq += (uint64_t)sent;
    s->tx += (uint64_t)sent; s->outstanding = (int64_t)(s->seq - s->acked); dp.client_tx += (uint64_t)sent;
}

/* The payload of a frame the server relayed back to a client, or NULL. */
static const uint8_t *payload_of(const uint8_t *b, int n) {
    if (n >= 4 && b[0] >= 0x40 && b[0] <= 0x7F) return n >= 4 + 24 ? b + 4 : NULL;
    parsed_t r;
    if (parse(b, n, &r) < 0 || r.type != T_DATA_IND || r.data_len < 24) return NULL;
    return r.data;
}

/* One of our payloads came back (p: the payload, t: now in ns when RTT is measured). */
static void echo_arrived(sess_t *s, const uint8_t *p, uint64_t t) {
    if (get32(p) != PAYLOAD_MAGIC) return;
    uint64_t seq;
    memcpy(&seq, p + 8, 8);
    /* One path, one server thread: echoes come back in order, so everything sent
     * before this one that is still missing was lost and leaves the window. */
    if (seq + 1 > s->acked && seq < s->seq) s->acked = seq + 1;
    if (rtt_ns) {
        uint64_t sent;
        memcpy(&sent, p + 16, 8);
        if (sent >= rtt_from_ns && rtt_n < rtt_cap) rtt_ns[rtt_n++] = t - sent;
    }
}

static double loop_now; /* the data loop's clock, for frames handed over by stream_read */

/* A frame from the server over a stream: relayed data, or a control-plane answer. */
static void data_frame(void *ctx, const uint8_t *b, int n) {
    sess_t *s = ctx;
    const uint8_t *p = payload_of(b, n);
    if (!p) { s_response(s, b, n); return; }
    echo_arrived(s, p, rtt_ns ? now_ns() : 0);
    s->rx++; dp.client_rx++;
    s->outstanding = (int64_t)(s->seq - s->acked);
    s->last_progress = loop_now;
}

static void drain_client(sess_t *s, uint32_t events, double now) {
    if (cfg.transport != TR_UDP) { loop_now = now; sess_stream_event(s, events, data_frame); return; }
    for (;;) {
        rx_reset(BATCH);
        int n = recvmmsg(s->fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        uint64_t t = rtt_ns ? now_ns() : 0;
        for (int i = 0; i < n; i++) {
            const uint8_t *p = payload_of(rx_buf[i], (int)rx_msgs[i].msg_len);
            if (p) echo_arrived(s, p, t);
        }
        s->rx += (uint64_t)n; dp.client_rx += (uint64_t)n;
        s->outstanding = (int64_t)(s->seq - s->acked);
        s->last_progress = now;
        if (n < BATCH) return;
    }
}

static struct mmsghdr echo_msgs[BATCH];
static uint8_t echo_cmsg[BATCH][CMSG_SPACE(sizeof(uint16_t))] __attribute__((aligned(8)));
static int echo_count[BATCH];

/* The echo peer: every datagram goes back to the relay address it came from. */
static void drain_peer(void) {
    for (int rounds = 0; rounds < 16; rounds++) {
        rx_reset(BATCH);
        int n = recvmmsg(peer_fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        dp.peer_rx += (uint64_t)n;
        for (int i = 0; i < n; i++) rx_iov[i].iov_len = rx_msgs[i].msg_len;
        /* Echo: consecutive datagrams from one relay address with one size leave as a
         * single GSO send (one mmsghdr with an iovec per datagram). */
        int m = 0;
        for (int i = 0; i < n;) {
            int j = i + 1;
            if (cfg.gso) {
                size_t len = rx_msgs[i].msg_len, total = len;
                while (j < n && rx_msgs[j].msg_len == len && total + len <= 65000 &&
                       rx_names[j].sin_port == rx_names[i].sin_port &&
                       rx_names[j].sin_addr.s_addr == rx_names[i].sin_addr.s_addr) {
                    total += len; j++;
                }
            }
            struct msghdr *h = &echo_msgs[m].msg_hdr;
            memset(h, 0, sizeof *h);
            h->msg_name = &rx_names[i]; h->msg_namelen = sizeof rx_names[i];
            h->msg_iov = &rx_iov[i]; h->msg_iovlen = (size_t)(j - i);
            if (j - i > 1) {
                struct cmsghdr *c = (struct cmsghdr *)echo_cmsg[m];
                c->cmsg_level = SOL_UDP; c->cmsg_type = UDP_SEGMENT; c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t seg = (uint16_t)rx_msgs[i].msg_len;
                memcpy(CMSG_DATA(c), &seg, sizeof seg);
                h->msg_control = c; h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
            }
            echo_count[m++] = j - i;
            i = j;
        }
        int off = 0;
        while (off < m) {
            int sent = sendmmsg(peer_fd, echo_msgs + off, (unsigned)(m - off), 0);
            if (sent <= 0) {
                if (sent < 0 && errno != EAGAIN && errno != ECONNREFUSED && errno != ENOBUFS)
                    die("sendmmsg(peer)");
                break; /* dropped, as UDP may */
            }
            for (int k = off; k < off + sent; k++) dp.peer_tx += (uint64_t)echo_count[k];
            off += sent;
        }
        if (n < BATCH) return;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!rtt_n) return -1;
    size_t i = (size_t)(q * (double)(rtt_n - 1) + 0.5);
    return (double)rtt_ns[i] / 1000.0;
}

static void open_peer(void) {
    struct sockaddr_in any;
    parse_addr("127.0.0.1:0", &any);
    peer_fd = udp_socket(&any, NULL);
    big_buffers(peer_fd);
    peer_addr = local_addr(peer_fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0xFFFFFFFFu};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, peer_fd, &ev) < 0) die("epoll_ctl(peer)");
}

static int mode_relay(double deadline) {
    open_peer();
    open_sessions(cfg.allocs);
    if (cfg.transport == TR_UDP)
        for (int i = 0; i < nsessions; i++) big_buffers(sessions[i].fd);
    after_alloc_state = cfg.send_kind ? S_PERM : S_CHBIND;
    double setup = run_control(S_IDLE, S_ALLOC0, 64, now_s() + 10);
    int ready = count_state(S_READY);
    if (ready != nsessions) {
        printf("{\"mode\":\"relay\",\"error\":\"only %d of %d allocations ready (last error %d%s%s)\"}\n",
               ready, nsessions, cp.last_error, tls_error[0] ? "; TLS: " : "", tls_error);
        return 1;
    }
    build_templates();
    if (cfg.rate == 0) enable_gso();
    if (cfg.rate > 0) {
        rtt_cap = (size_t)(cfg.rate * (cfg.duration + 1)) + 1024;
        rtt_ns = malloc(rtt_cap * sizeof *rtt_ns);
        if (!rtt_ns) die("malloc");
    }
    rtt_from_ns = UINT64_MAX;
    double t0 = now_s(), warm_end = t0 + cfg.warmup, end = warm_end + cfg.duration;
    if (end > deadline) end = deadline;
    double next_send = t0, interval = cfg.rate > 0 ? 1.0 / cfg.rate : 0, last_stall_check = t0;
    double m_start = 0, m_end = 0;
    cpu_snap sa = {0}, sb = {0};
    uint64_t c_rx0 = 0, p_rx0 = 0, c_tx0 = 0, c_rx1 = 0, p_rx1 = 0, c_tx1 = 0;
    int measuring = 0, rr = 0;
    const double stall = 0.05;
    for (int i = 0; i < nsessions; i++) sessions[i].last_progress = t0;
    struct epoll_event evs[64];
    for (;;) {
        double now = now_s();
        uint64_t work_before = dp.client_tx + dp.peer_rx + dp.client_rx;
        idle_top(now);
        if (!measuring && now >= warm_end) {
            measuring = 1; m_start = now; sa = snap(); idle_start();
            c_rx0 = dp.client_rx; p_rx0 = dp.peer_rx; c_tx0 = dp.client_tx;
            rtt_from_ns = now_ns();
            rtt_n = 0;
        }
        if (now >= end || dp.client_tx >= cfg.max_packets) {
            m_end = now; sb = snap();
            c_rx1 = dp.client_rx; p_rx1 = dp.peer_rx; c_tx1 = dp.client_tx;
            break;
        }
        int n = epoll_wait(epfd, evs, 64, 0);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == 0xFFFFFFFFu) drain_peer();
            else if (id < (uint32_t)nsessions) drain_client(&sessions[id], evs[i].events, now);
        }
        if (cfg.rate > 0) {
            int burst = 0;
            while (now >= next_send && burst < BATCH) {
                sess_t *s = &sessions[rr];
                send_burst(s, 1, (uint32_t)rr);
                rr = (rr + 1) % nsessions;
                next_send += interval;
                burst++;
            }
            if (now - next_send > 0.5) next_send = now; /* cannot keep up: do not catch up */
        } else {
            for (int i = 0; i < nsessions; i++) {
                sess_t *s = &sessions[i];
                int room = cfg.window - (int)s->outstanding;
                if (room > 0) send_burst(s, room < BATCH ? room : BATCH, (uint32_t)i);
            }
        }
        if (now - last_stall_check > 0.02) {
            last_stall_check = now;
            for (int i = 0; i < nsessions; i++) {
                sess_t *s = &sessions[i];
                if (s->outstanding > 0 && now - s->last_progress > stall) {
                    s->acked = s->seq; /* presume what is in flight lost */
                    s->outstanding = 0;
                    s->last_progress = now;
                    dp.stalls++;
                }
            }
        }
        idle.was_idle = dp.client_tx + dp.peer_rx + dp.client_rx == work_before;
    }
    /* Let the last packets land so that nothing is counted twice on a later run. */
    double drain_until = now_s() + 0.05;
    while (now_s() < drain_until) {
        int n = epoll_wait(epfd, evs, 64, 5);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == 0xFFFFFFFFu) drain_peer();
        }
    }
    double secs = m_end - m_start;
    uint64_t relayed = (p_rx1 - p_rx0) + (c_rx1 - c_rx0);
    double cpu = sa.server >= 0 && sb.server >= 0 ? sb.server - sa.server : -1;
    if (rtt_n) qsort(rtt_ns, rtt_n, sizeof *rtt_ns, cmp_u64);
    printf("{\"mode\":\"relay\",\"kind\":\"%s\",\"allocs\":%d,\"payload\":%d,\"window\":%d,"
           "\"rate\":%.0f,\"setup_s\":%.4f,\"seconds\":%.4f,\"client_tx\":%llu,\"peer_rx\":%llu,"
           "\"client_rx\":%llu,\"relayed\":%llu,\"relayed_pps\":%.1f,\"roundtrips_ps\":%.1f,"
           "\"loss\":%.5f,\"stalls\":%llu,\"cpu_us_per_pkt\":%.4f,"
           "\"rtt_samples\":%zu,\"rtt_p50_us\":%.1f,\"rtt_p99_us\":%.1f,"
           "\"rtt_p999_us\":%.1f,\"rtt_max_us\":%.1f",
           cfg.send_kind ? "send" : "channel", cfg.allocs, cfg.payload, cfg.window, cfg.rate,
           setup, secs, (unsigned long long)(c_tx1 - c_tx0), (unsigned long long)(p_rx1 - p_rx0),
           (unsigned long long)(c_rx1 - c_rx0), (unsigned long long)relayed,
           (double)relayed / secs, (double)(c_rx1 - c_rx0) / secs,
           c_tx1 > c_tx0 ? 1.0 - (double)(c_rx1 - c_rx0) / (double)(c_tx1 - c_tx0) : 0.0,
           (unsigned long long)dp.stalls, cpu >= 0 && relayed ? cpu / (double)relayed * 1e6 : -1,
           rtt_n, pct(0.5), pct(0.99), pct(0.999), pct(1.0));
    if (cfg.transport != TR_UDP) printf(",\"lost\":%llu", (unsigned long long)cp.lost);
    print_transport();
    print_cpu(&sa, &sb);
    printf("}\n");
    return 0;
}

static int mode_binding(double deadline) {
    open_sessions(cfg.sockets);
    uint8_t txid[12];
    new_txid(txid);
    for (int i = 0; i < BATCH; i++) {
        msg_t m;
        new_txid(txid);
        m_init(&m, T_BINDING, txid);
        memcpy(tx_buf[i], m.b, 20);
        tx_iov[i].iov_base = tx_buf[i]; tx_iov[i].iov_len = 20;
        memset(&tx_msgs[i], 0, sizeof tx_msgs[i]);
        tx_msgs[i].msg_hdr.msg_iov = &tx_iov[i]; tx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    double t0 = now_s(), warm_end = t0 + cfg.warmup, end = warm_end + cfg.duration;
    if (end > deadline) end = deadline;
    double m_start = 0, m_end = 0, last_stall_check = t0;
    cpu_snap sa = {0}, sb = {0};
    uint64_t ok = 0, ok0 = 0, ok1 = 0, tx = 0, tx0 = 0, tx1 = 0, bad = 0;
    int measuring = 0;
    for (int i = 0; i < nsessions; i++) sessions[i].last_progress = t0;
    struct epoll_event evs[64];
    for (;;) {
        double now = now_s();
        uint64_t work_before = ok + bad + tx;
        idle_top(now);
        if (!measuring && now >= warm_end) { measuring = 1; m_start = now; sa = snap(); idle_start(); ok0 = ok; tx0 = tx; }
        if (now >= end || tx >= cfg.max_packets) { m_end = now; sb = snap(); ok1 = ok; tx1 = tx; break; }
        int n = epoll_wait(epfd, evs, 64, 0);
        for (int e = 0; e < n; e++) {
            sess_t *s = &sessions[evs[e].data.u32];
            for (;;) {
                rx_reset(BATCH);
                int k = recvmmsg(s->fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
                if (k <= 0) break;
                for (int i = 0; i < k; i++) {
                    if (rx_msgs[i].msg_len >= 20 && get16(rx_buf[i]) == T_BINDING_OK) ok++;
                    else bad++;
                }
                s->outstanding -= k;
                if (s->outstanding < 0) s->outstanding = 0;
                s->last_progress = now;
                if (k < BATCH) break;
            }
        }
        for (int i = 0; i < nsessions; i++) {
            sess_t *s = &sessions[i];
            int room = cfg.window - (int)s->outstanding;
            if (room <= 0) continue;
            if (room > BATCH) room = BATCH;
            int sent = sendmmsg(s->fd, tx_msgs, (unsigned)room, 0);
            if (sent > 0) { s->outstanding += sent; tx += (uint64_t)sent; }
        }
        if (now - last_stall_check > 0.02) {
            last_stall_check = now;
            for (int i = 0; i < nsessions; i++) {
                sess_t *s = &sessions[i];
                if (s->outstanding > 0 && now - s->last_progress > 0.1) {
                    s->outstanding = 0; s->last_progress = now; dp.stalls++;
                }
            }
        }
        idle.was_idle = ok + bad + tx == work_before;
    }
    double secs = m_end - m_start;
    double cpu = sa.server >= 0 && sb.server >= 0 ? sb.server - sa.server : -1;
    printf("{\"mode\":\"binding\",\"sockets\":%d,\"window\":%d,\"seconds\":%.4f,\"sent\":%llu,"
           "\"answered\":%llu,\"bad\":%llu,\"stalls\":%llu,\"rps\":%.1f,"
           "\"cpu_us_per_req\":%.4f",
           cfg.sockets, cfg.window, secs, (unsigned long long)(tx1 - tx0),
           (unsigned long long)(ok1 - ok0), (unsigned long long)bad, (unsigned long long)dp.stalls,
           (double)(ok1 - ok0) / secs, cpu >= 0 && ok1 > ok0 ? cpu / (double)(ok1 - ok0) * 1e6 : -1);
    print_cpu(&sa, &sb);
    printf("}\n");
    return 0;
}

static int mode_alloc(double deadline) {
    open_sessions(cfg.inflight);
    cycle_allocs = 1;
    double t0 = now_s(), warm_end = t0 + cfg.warmup, end = warm_end + cfg.duration, last_check = t0;
    if (end > deadline) end = deadline;
    double m_start = 0, m_end = 0;
    cpu_snap sa = {0}, sb = {0};
    uint64_t ok1 = 0, cyc1 = 0, err0 = 0, err1 = 0, to0 = 0, to1 = 0, con0 = 0, con1 = 0;
    struct epoll_event evs[256];
    for (;;) {
        double now = now_s();
        idle_top(now);
        if (!measuring_cp && now >= warm_end) {
            measuring_cp = 1; m_start = now; sa = snap(); idle_start();
            cp_alloc_ok_at_start = cp.alloc_ok; cp_cycles_at_start = cp.cycles;
            err0 = cp.errors; to0 = cp.timeouts; con0 = cp.connects;
        }
        if (now >= end || cp.alloc_ok >= cfg.max_packets) {
            m_end = now; sb = snap();
            ok1 = cp.alloc_ok; cyc1 = cp.cycles; err1 = cp.errors; to1 = cp.timeouts;
            con1 = cp.connects;
            break;
        }
        int started = 0;
        for (int i = 0; i < nsessions; i++)
            if (sessions[i].state == S_IDLE) { s_request(&sessions[i], S_ALLOC0); started++; }
        int n = epoll_wait(epfd, evs, 256, 0);
        for (int i = 0; i < n; i++) drain_control(&sessions[evs[i].data.u32], evs[i].events);
        if (now - last_check > 0.05) { check_timeouts(now); last_check = now; }
        idle.was_idle = n == 0 && started == 0;
    }
    /* Free what is still allocated, so the server is left as it was found. */
    cycle_allocs = 0;
    double release_deadline = now_s() + 2;
    struct epoll_event ev2[256];
    while (now_s() < release_deadline) {
        int busy = 0;
        for (int i = 0; i < nsessions; i++) busy += waiting(sessions[i].state);
        if (!busy) break;
        int n = epoll_wait(epfd, ev2, 256, 5);
        for (int i = 0; i < n; i++) drain_control(&sessions[ev2[i].data.u32], ev2[i].events);
    }
    for (int i = 0; i < nsessions; i++)
        if (sessions[i].state == S_READY) s_request(&sessions[i], S_REFRESH0);
    run_control(-1, S_REFRESH0, nsessions, release_deadline);
    double secs = m_end - m_start;
    double cpu = sa.server >= 0 && sb.server >= 0 ? sb.server - sa.server : -1;
    uint64_t ok = ok1 - cp_alloc_ok_at_start;
    printf("{\"mode\":\"alloc\",\"inflight\":%d,\"seconds\":%.4f,\"allocates\":%llu,\"cycles\":%llu,"
           "\"errors\":%llu,\"timeouts\":%llu,\"last_error\":%d,\"stale_nonces\":%llu,"
           "\"allocs_ps\":%.1f,\"cpu_us_per_alloc\":%.2f",
           cfg.inflight, secs, (unsigned long long)ok, (unsigned long long)(cyc1 - cp_cycles_at_start),
           (unsigned long long)(err1 - err0), (unsigned long long)(to1 - to0), cp.last_error,
           (unsigned long long)cp.stale, (double)ok / secs,
           cpu >= 0 && ok ? cpu / (double)ok * 1e6 : -1);
    if (cfg.transport != TR_UDP)
        printf(",\"connects\":%llu,\"connects_ps\":%.1f,\"lost\":%llu", (unsigned long long)(con1 - con0),
               (double)(con1 - con0) / secs, (unsigned long long)cp.lost);
    print_transport();
    print_cpu(&sa, &sb);
    printf("}\n");
    (void)deadline;
    return 0;
}

static int mode_hold(double deadline) {
    open_peer();
    open_sessions(cfg.allocs);
    after_alloc_state = S_CHBIND;
    double setup = run_control(S_IDLE, S_ALLOC0, cfg.inflight, deadline);
    int held = count_state(S_READY);
    printf("{\"event\":\"held\",\"held\":%d,\"failed\":%d,\"last_error\":%d,\"setup_s\":%.3f,"
           "\"timeouts\":%llu,\"lost\":%llu",
           held, nsessions - held, cp.last_error, setup, (unsigned long long)cp.timeouts,
           (unsigned long long)cp.lost);
    print_transport();
    printf("}\n");
    fflush(stdout);
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    int wait_ms = (int)((deadline - now_s()) * 1000);
    if (wait_ms < 0) wait_ms = 0;
    if (poll(&pfd, 1, wait_ms) <= 0) fprintf(stderr, "loadgen: no release command in time\n");
    char line[64];
    if (pfd.revents & POLLIN) (void)!read(0, line, sizeof line);
    double release = run_control(S_READY, S_REFRESH0, cfg.inflight, now_s() + 20);
    printf("{\"event\":\"released\",\"released\":%d,\"release_s\":%.3f}\n", count_state(S_DONE), release);
    fflush(stdout);
    for (int i = 0; i < nsessions; i++) {
        if (cfg.transport == TR_UDP) close(sessions[i].fd);
        else stream_close(&sessions[i].st);
    }
    return 0;
}

/* ---------------------------------------------------------------- stub forwarder */

typedef struct sclient {
    struct sockaddr_in addr;
    int relay_fd, has_channel;
    uint16_t channel;
    struct sockaddr_in peer;
    struct sclient *next; /* hash chain */
} sclient_t;

#define NBUCKETS 65536
static sclient_t *buckets[NBUCKETS];
static sclient_t *by_fd[65536];

static unsigned bucket_of(const struct sockaddr_in *a) {
    uint32_t h = a->sin_addr.s_addr * 2654435761u ^ (uint32_t)a->sin_port * 40503u;
    return (h ^ (h >> 16)) % NBUCKETS;
}

static sclient_t *stub_find(const struct sockaddr_in *a) {
    for (sclient_t *c = buckets[bucket_of(a)]; c; c = c->next)
        if (c->addr.sin_port == a->sin_port && c->addr.sin_addr.s_addr == a->sin_addr.s_addr) return c;
    return NULL;
}

static int stub_fd;

static void stub_reply(const msg_t *m, const struct sockaddr_in *to) {
    sendto(stub_fd, m->b, (size_t)m->len, 0, (const struct sockaddr *)to, sizeof *to);
}

static void stub_close(sclient_t *c) {
    sclient_t **pp = &buckets[bucket_of(&c->addr)];
    while (*pp != c) pp = &(*pp)->next;
    *pp = c->next;
    by_fd[c->relay_fd] = NULL;
    close(c->relay_fd);
    free(c);
}

/* A relay socket for a stub client, in the epoll set under its own descriptor; -1 when
 * none can be had (the answer is then 508). */
static int stub_relay_socket(void) {
    struct sockaddr_in any;
    parse_addr("127.0.0.1:0", &any);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (fd >= 65536 || bind(fd, (struct sockaddr *)&any, sizeof any) < 0) { close(fd); return -1; }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)fd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

/* The stub's answer to request r from `from`, whose relay socket is relay_fd (-1: none).
 * The caller keeps the client's state (relay socket, channel) and sends the answer.
 * Returns 0 when there is nothing to answer. */
static int stub_answer(const parsed_t *r, const uint8_t *txid, const struct sockaddr_in *from,
                       int relay_fd, msg_t *m) {
    switch (r->type & 0x3EEF) {
    case T_BINDING:
        m_init(m, T_BINDING_OK, txid);
        m_xor_addr(m, A_XOR_MAPPED, from);
        return 1;
    case T_ALLOCATE:
        if (!r->has_mi) {
            uint8_t err[4] = {0, 0, 4, 1};
            m_init(m, 0x0113, txid);
            m_attr(m, A_ERROR_CODE, err, 4);
            m_attr(m, A_REALM, "stub", 4);
            m_attr(m, A_NONCE, "stub-nonce", 10);
            return 1;
        }
        if (relay_fd < 0) {
            uint8_t err[4] = {0, 0, 5, 8};
            m_init(m, 0x0113, txid);
            m_attr(m, A_ERROR_CODE, err, 4);
            return 1;
        }
        m_init(m, 0x0103, txid);
        {
            struct sockaddr_in relayed = local_addr(relay_fd);
            m_xor_addr(m, A_XOR_RELAYED, &relayed);
        }
        m_u32(m, A_LIFETIME, 600);
        m_xor_addr(m, A_XOR_MAPPED, from);
        return 1;
    case T_REFRESH:
        m_init(m, 0x0104, txid);
        m_u32(m, A_LIFETIME, r->has_lifetime ? r->lifetime : 600);
        return 1;
    case T_CREATE_PERM:
        m_init(m, 0x0108, txid);
        return 1;
    case T_CHANNEL_BIND:
        m_init(m, 0x0109, txid);
        return 1;
    default:
        return 0;
    }
}

static void stub_stun(const uint8_t *b, int n, const struct sockaddr_in *from) {
    parsed_t r;
    if (parse(b, n, &r) < 0) return;
    sclient_t *c = stub_find(from);
    msg_t m;
    uint16_t method = r.type & 0x3EEF;
    if (r.type == T_SEND_IND) {
        if (c && r.has_peer && r.data)
            sendto(c->relay_fd, r.data, (size_t)r.data_len, 0, (struct sockaddr *)&r.peer, sizeof r.peer);
        return;
    }
    if ((r.type & 0x0110) != 0) return; /* requests only */
    if (method == T_ALLOCATE && r.has_mi && !c) {
        int fd = stub_relay_socket();
        if (fd >= 0) {
            c = calloc(1, sizeof *c);
            c->addr = *from; c->relay_fd = fd;
            unsigned bucket = bucket_of(from);
            c->next = buckets[bucket]; buckets[bucket] = c; by_fd[fd] = c;
        }
    }
    if (method == T_CHANNEL_BIND && c && r.has_peer && r.channel >= 0) {
        c->has_channel = 1; c->channel = (uint16_t)r.channel; c->peer = r.peer;
    }
    if (!stub_answer(&r, b + 8, from, c ? c->relay_fd : -1, &m)) return;
    if (method == T_REFRESH && c && r.has_lifetime && r.lifetime == 0) stub_close(c);
    stub_reply(&m, from);
}

static uint8_t srx[BATCH][PKT];

/* Send iov[0..count) to one address with one sendmmsg, each run of equal-sized datagrams
 * (the last may be shorter) as one UDP GSO message: what pyturn's native module does,
 * so that the stub stays the ceiling it is meant to be. --gso 0 turns it off. */
static void stub_send_runs(int fd, struct iovec *iov, int count, struct sockaddr_in *to) {
    static struct mmsghdr msgs[BATCH];
    static union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } ctl[BATCH];
    int m = 0;
    for (int i = 0; i < count;) {
        size_t size = iov[i].iov_len, total = size;
        int j = i + 1;
        while (cfg.gso && size > 0 && j < count && j - i < 64 && iov[j].iov_len > 0 &&
               iov[j].iov_len <= size && total + iov[j].iov_len <= 65000) {
            total += iov[j].iov_len;
            if (iov[j++].iov_len < size) break;
        }
        struct msghdr *h = &msgs[m].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_name = to; h->msg_namelen = sizeof *to;
        h->msg_iov = &iov[i]; h->msg_iovlen = (size_t)(j - i);
        if (j - i > 1) {
            h->msg_control = ctl[m].buf; h->msg_controllen = sizeof ctl[m].buf;
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP; c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)size;
            memcpy(CMSG_DATA(c), &seg, sizeof seg);
        }
        m++; i = j;
    }
    if (m > 0) sendmmsg(fd, msgs, (unsigned)m, 0);
}

static void stub_listener(void) {
    struct iovec oiov[BATCH];
    struct sockaddr_in *opeer[BATCH];
    int ofd[BATCH];
    for (int rounds = 0; rounds < 16; rounds++) {
        for (int i = 0; i < BATCH; i++) {
            rx_iov[i].iov_base = srx[i]; rx_iov[i].iov_len = PKT;
            rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i]; rx_msgs[i].msg_hdr.msg_iovlen = 1;
            rx_msgs[i].msg_hdr.msg_name = &rx_names[i]; rx_msgs[i].msg_hdr.msg_namelen = sizeof rx_names[i];
        }
        int n = recvmmsg(stub_fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        int k = 0;
        for (int i = 0; i < n; i++) {
            const uint8_t *b = srx[i];
            int len = (int)rx_msgs[i].msg_len;
            if (len >= 4 && b[0] >= 0x40 && b[0] <= 0x7F) {
                sclient_t *c = stub_find(&rx_names[i]);
                int dlen = get16(b + 2);
                if (!c || !c->has_channel || get16(b) != c->channel || 4 + dlen > len) continue;
                /* keep the batch grouped by relay socket (stable), as pyturn groups flows */
                int at = k;
                while (at > 0 && ofd[at - 1] > c->relay_fd) {
                    oiov[at] = oiov[at - 1]; ofd[at] = ofd[at - 1]; opeer[at] = opeer[at - 1];
                    at--;
                }
                oiov[at].iov_base = (void *)(b + 4); oiov[at].iov_len = (size_t)dlen;
                ofd[at] = c->relay_fd; opeer[at] = &c->peer;
                k++;
            } else {
                stub_stun(b, len, &rx_names[i]);
            }
        }
        /* one send per relay socket: its client's single peer */
        for (int i = 0; i < k;) {
            int j = i;
            while (j < k && ofd[j] == ofd[i]) j++;
            stub_send_runs(ofd[i], oiov + i, j - i, opeer[i]);
            i = j;
        }
        if (n < BATCH) return;
    }
}

static void stub_relay(int fd) {
    sclient_t *c = by_fd[fd];
    if (!c) return;
    struct sockaddr_in from[BATCH];
    for (int rounds = 0; rounds < 4; rounds++) {
        for (int i = 0; i < BATCH; i++) {
            rx_iov[i].iov_base = srx[i] + HEADROOM; rx_iov[i].iov_len = PKT - HEADROOM - 4;
            rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i]; rx_msgs[i].msg_hdr.msg_iovlen = 1;
            rx_msgs[i].msg_hdr.msg_name = &from[i]; rx_msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) {
            int len = (int)rx_msgs[i].msg_len;
            uint8_t *b = srx[i];
            if (c->has_channel && from[i].sin_port == c->peer.sin_port &&
                from[i].sin_addr.s_addr == c->peer.sin_addr.s_addr) {
                put16(b + HEADROOM - 4, c->channel); put16(b + HEADROOM - 2, (uint16_t)len);
                rx_iov[i].iov_base = b + HEADROOM - 4; rx_iov[i].iov_len = (size_t)(4 + len);
            } else {
                int padded = (len + 3) & ~3;
                uint8_t txid[12];
                new_txid(txid);
                put16(b, T_DATA_IND); put16(b + 2, (uint16_t)(12 + 4 + padded));
                put32(b + 4, COOKIE); memcpy(b + 8, txid, 12);
                put16(b + 20, A_XOR_PEER); put16(b + 22, 8); xor_addr(b + 24, &from[i]);
                put16(b + 32, A_DATA); put16(b + 34, (uint16_t)len);
                memset(b + HEADROOM + len, 0, (size_t)(padded - len));
                rx_iov[i].iov_base = b; rx_iov[i].iov_len = (size_t)(HEADROOM + padded);
            }
        }
        stub_send_runs(stub_fd, rx_iov, n, &c->addr);
        if (n < BATCH) return;
    }
}

/* The stub over TCP and TLS: one connection per client, framed as RFC 8656 says, with
 * its own UDP relay socket towards its single peer. */
typedef struct {
    stream_t st;
    int relay_fd, has_channel;
    uint16_t channel;
    struct sockaddr_in addr, peer;
    int k; /* ChannelData payloads read and not yet sent to the peer: sconn_iov */
} sconn_t;

static sconn_t *sconn_of[65536]; /* by descriptor: the connection's own, or its relay's */
static struct iovec sconn_iov[BATCH];
static SSL_CTX *stub_tls;
static int stub_listen_fd;

static void sconn_close(sconn_t *c) {
    sconn_of[c->st.fd] = NULL;
    if (c->relay_fd >= 0) { sconn_of[c->relay_fd] = NULL; close(c->relay_fd); }
    stream_close(&c->st);
    free(c->st.in);
    free(c->st.out);
    free(c);
}

/* The ChannelData payloads of one read go to the peer in one sendmmsg (GSO runs). */
static void sconn_send_peer(void *ctx) {
    sconn_t *c = ctx;
    if (c->k && c->relay_fd >= 0) stub_send_runs(c->relay_fd, sconn_iov, c->k, &c->peer);
    c->k = 0;
}

/* Answers go to the send buffer; sconn_event writes them once, after the whole read. */
static void sconn_frame(void *ctx, const uint8_t *b, int n) {
    sconn_t *c = ctx;
    if (b[0] >= 0x40 && b[0] <= 0x7F) {
        int dlen = get16(b + 2);
        if (!c->has_channel || get16(b) != c->channel || 4 + dlen > n) return;
        if (c->k == BATCH) sconn_send_peer(c);
        sconn_iov[c->k].iov_base = (void *)(b + 4);
        sconn_iov[c->k++].iov_len = (size_t)dlen;
        return;
    }
    parsed_t r;
    if (parse(b, n, &r) < 0) return;
    if (r.type == T_SEND_IND) {
        if (c->relay_fd >= 0 && r.has_peer && r.data)
            sendto(c->relay_fd, r.data, (size_t)r.data_len, 0, (struct sockaddr *)&r.peer, sizeof r.peer);
        return;
    }
    if ((r.type & 0x0110) != 0) return; /* requests only */
    uint16_t method = r.type & 0x3EEF;
    if (method == T_ALLOCATE && r.has_mi && c->relay_fd < 0) {
        c->relay_fd = stub_relay_socket();
        if (c->relay_fd >= 0) sconn_of[c->relay_fd] = c;
    }
    if (method == T_CHANNEL_BIND && r.has_peer && r.channel >= 0) {
        c->has_channel = 1; c->channel = (uint16_t)r.channel; c->peer = r.peer;
    }
    msg_t m;
    if (!stub_answer(&r, b + 8, &c->addr, c->relay_fd, &m)) return;
    if (method == T_REFRESH && r.has_lifetime && r.lifetime == 0 && c->relay_fd >= 0) {
        sconn_send_peer(c); /* what came before the release still goes */
        sconn_of[c->relay_fd] = NULL;
        close(c->relay_fd);
        c->relay_fd = -1;
        c->has_channel = 0;
    }
    uint8_t *p = stream_reserve(&c->st, (size_t)m.len);
    if (p) memcpy(p, m.b, (size_t)m.len);
}

static void sconn_event(sconn_t *c, uint32_t events) {
    stream_t *t = &c->st;
    if (t->phase == P_HANDSHAKE) {
        int r = stream_handshake(t);
        if (r < 0) { sconn_close(c); return; }
        if (r == 0) return;
    }
    if (t->ssl || (events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
        int r = stream_read(t, sconn_frame, sconn_send_peer, c);
        if (r < 0) { sconn_close(c); return; }
    }
    if (stream_flush(t) < 0) sconn_close(c);
}

/* What the peer sent back, as ChannelData (padded) or Data indications, to the send
 * buffer; then one write for the lot. */
static void sconn_relay(sconn_t *c) {
    struct sockaddr_in from[BATCH];
    for (int rounds = 0; rounds < 4; rounds++) {
        for (int i = 0; i < BATCH; i++) {
            rx_iov[i].iov_base = srx[i]; rx_iov[i].iov_len = PKT;
            rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i]; rx_msgs[i].msg_hdr.msg_iovlen = 1;
            rx_msgs[i].msg_hdr.msg_name = &from[i]; rx_msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(c->relay_fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break;
        for (int i = 0; i < n; i++) {
            int len = (int)rx_msgs[i].msg_len, padded = (len + 3) & ~3;
            if (c->has_channel && from[i].sin_port == c->peer.sin_port &&
                from[i].sin_addr.s_addr == c->peer.sin_addr.s_addr) {
                uint8_t *p = stream_reserve(&c->st, (size_t)(4 + padded));
                if (!p) continue;
                put16(p, c->channel); put16(p + 2, (uint16_t)len);
                memcpy(p + 4, srx[i], (size_t)len);
                memset(p + 4 + len, 0, (size_t)(padded - len));
            } else {
                uint8_t *p = stream_reserve(&c->st, (size_t)(HEADROOM + padded)), txid[12];
                if (!p) continue;
                new_txid(txid);
                put16(p, T_DATA_IND); put16(p + 2, (uint16_t)(12 + 4 + padded));
                put32(p + 4, COOKIE); memcpy(p + 8, txid, 12);
                put16(p + 20, A_XOR_PEER); put16(p + 22, 8); xor_addr(p + 24, &from[i]);
                put16(p + 32, A_DATA); put16(p + 34, (uint16_t)len);
                memcpy(p + HEADROOM, srx[i], (size_t)len);
                memset(p + HEADROOM + len, 0, (size_t)(padded - len));
            }
        }
        if (n < BATCH) break;
    }
    if (stream_flush(&c->st) < 0) sconn_close(c);
}

static void sconn_accept(void) {
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        int fd = accept4(stub_listen_fd, (struct sockaddr *)&from, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= 65536) { close(fd); continue; }
        tcp_nodelay(fd);
        sconn_t *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->st.fd = fd; c->st.id = (uint32_t)fd; c->st.phase = P_OPEN;
        c->relay_fd = -1; c->addr = from;
        if (stub_tls) {
            c->st.ssl = SSL_new(stub_tls);
            if (!c->st.ssl || !SSL_set_fd(c->st.ssl, fd)) { fprintf(stderr, "loadgen: SSL_new failed\n"); exit(2); }
            SSL_set_accept_state(c->st.ssl);
            c->st.phase = P_HANDSHAKE;
        }
        sconn_of[fd] = c;
        stream_watch(&c->st);
    }
}

static void stub_tls_init(void) {
    if (!cfg.cert || !cfg.pkey) { fprintf(stderr, "loadgen: stub over tls needs --cert and --pkey\n"); exit(2); }
    stub_tls = SSL_CTX_new(TLS_server_method());
    if (!stub_tls || SSL_CTX_use_certificate_chain_file(stub_tls, cfg.cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(stub_tls, cfg.pkey, SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "loadgen: cannot load the stub's certificate and key\n");
        ERR_print_errors_fp(stderr);
        exit(2);
    }
    SSL_CTX_set_mode(stub_tls, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
}

/* A TCP listener on --listen: "port N" as over UDP. */
static int stub_stream_listen(void) {
    if (cfg.transport == TR_TLS) stub_tls_init();
    stub_listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (stub_listen_fd < 0) die("socket(listen)");
    int one = 1;
    setsockopt(stub_listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(stub_listen_fd, (struct sockaddr *)&cfg.listen, sizeof cfg.listen) < 0) die("bind(listen)");
    if (listen(stub_listen_fd, 4096) < 0) die("listen");
    return stub_listen_fd;
}

static int mode_stub(double deadline) {
    int stream = cfg.transport != TR_UDP;
    stub_fd = stream ? stub_stream_listen() : udp_socket(&cfg.listen, NULL);
    if (!stream) big_buffers(stub_fd);
    struct sockaddr_in a = local_addr(stub_fd);
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0xFFFFFFFFu};
    epoll_ctl(epfd, EPOLL_CTL_ADD, stub_fd, &ev);
    struct epoll_event in = {.events = EPOLLIN, .data.u32 = 0xFFFFFFFEu};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &in);
    struct epoll_event evs[256];
    while (now_s() < deadline) {
        int n = epoll_wait(epfd, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == 0xFFFFFFFFu) {
                if (stream) sconn_accept();
                else stub_listener();
            } else if (id == 0xFFFFFFFEu) {
                char buf[64];
                if (read(0, buf, sizeof buf) <= 0) return 0; /* stdin closed: stop */
            } else if (!stream) {
                stub_relay((int)id);
            } else if (sconn_of[id]) {
                sconn_t *c = sconn_of[id];
                if ((int)id == c->st.fd) sconn_event(c, evs[i].events);
                else sconn_relay(c);
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    self_test();
    rng_state ^= now_ns() ^ ((uint64_t)getpid() << 32);
    next_client_ip = (uint32_t)(rnd() % (235u << 16));
    double deadline = now_s() + cfg.max_time;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    signal(SIGPIPE, SIG_IGN); /* OpenSSL writes with write(): a reset is an error, not a signal */
    if (!strcmp(cfg.mode, "stub")) return mode_stub(deadline);
    if (!cfg.server.sin_port) { fprintf(stderr, "loadgen: --server is required\n"); return 2; }
    if (strcmp(cfg.mode, "binding") && !cfg.have_key) { fprintf(stderr, "loadgen: --key is required\n"); return 2; }
    if (!strcmp(cfg.mode, "binding") && cfg.transport != TR_UDP) {
        fprintf(stderr, "loadgen: binding is over udp only\n");
        return 2;
    }
    if (cfg.transport == TR_TLS) tls_client_init();
    int rc;
    if (!strcmp(cfg.mode, "relay")) rc = mode_relay(deadline);
    else if (!strcmp(cfg.mode, "binding")) rc = mode_binding(deadline);
    else if (!strcmp(cfg.mode, "alloc")) rc = mode_alloc(deadline);
    else if (!strcmp(cfg.mode, "hold")) rc = mode_hold(deadline);
    else { fprintf(stderr, "loadgen: unknown mode %s\n", cfg.mode); return 2; }
    fflush(stdout);
    return rc;
}

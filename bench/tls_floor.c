/* The floor under a TCP or TLS connection cycle, without TURN: bench/tls_floor.py.
 *
 *   tls_floor server PORT tcp|tls [CERT KEY]
 *       A one-thread epoll server on 127.0.0.1:PORT that answers every read with 100
 *       bytes: the least a C server (coturn's kind) can do per connection. Serves until
 *       its standard input closes.
 *   tls_floor client PORT tcp|tls INFLIGHT SECONDS
 *       INFLIGHT connections at once, each cycling: connect (from its own 127.x source
 *       address), TLS 1.2 handshake (tls), three times a 100-byte request and its 100-byte
 *       answer, close. Prints {"cycles_ps":..,"failures":..} after SECONDS.
 *
 * Loopback only. The client verifies nothing and resumes no session: every cycle is a
 * full handshake, as in the TURN benchmark's figure 11.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME 100
#define EXCHANGES 3

typedef struct {
    int fd, step, got, handshaken, wants_write;
    uint32_t source;
    SSL *ssl;
} conn_t;

static int use_tls, epfd, port;
static SSL_CTX *ctx;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void fail(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in loopback(uint32_t host, int p) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)p);
    a.sin_addr.s_addr = htonl(host);
    return a;
}

static void watch(conn_t *c, uint32_t events, int op) {
    struct epoll_event e = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &e) < 0) fail("epoll_ctl");
}

/* 1: the whole buffer went out; 0: it did not (a loopback socket this small never fills) */
static int put(conn_t *c, const char *b, int n) {
    if (use_tls) return SSL_write(c->ssl, b, n) == n;
    return send(c->fd, b, (size_t)n, MSG_NOSIGNAL) == n;
}

/* >0 bytes, 0 nothing yet, -1 closed or failed */
static int get(conn_t *c, char *b, int n) {
    if (use_tls) {
        int r = SSL_read(c->ssl, b, n);
        if (r > 0) return r;
        return SSL_get_error(c->ssl, r) == SSL_ERROR_WANT_READ ? 0 : -1;
    }
    ssize_t r = recv(c->fd, b, (size_t)n, 0);
    if (r > 0) return (int)r;
    return r < 0 && errno == EAGAIN ? 0 : -1;
}

/* 1 done, 0 not yet, -1 failed */
static int handshake(conn_t *c) {
    if (!use_tls || c->handshaken) return 1;
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->handshaken = 1;
        return 1;
    }
    int e = SSL_get_error(c->ssl, r);
    c->wants_write = e == SSL_ERROR_WANT_WRITE;
    return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? 0 : -1;
}

static void drop(conn_t *c) {
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    close(c->fd);
}

static _Noreturn void serve(void) {
    int one = 1;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = loopback(0x7f000001, port);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&a, sizeof a) < 0 || listen(listener, 1024) < 0)
        fail("listen");
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &le);
    /* the measuring script holds our stdin: when it goes, so do we */
    static conn_t parent = {.fd = 0};
    struct epoll_event pe = {.events = EPOLLIN, .data.ptr = &parent};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &pe);
    char buf[16384], answer[FRAME];
    memset(answer, 'a', sizeof answer);
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        struct epoll_event ev[64];
        int k = epoll_wait(epfd, ev, 64, 1000);
        for (int i = 0; i < k; i++) {
            conn_t *c = ev[i].data.ptr;
            if (c == &parent) exit(0);
            if (c == NULL) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c) fail("calloc");
                    c->fd = fd;
                    if (use_tls) {
                        c->ssl = SSL_new(ctx);
                        if (!c->ssl || !SSL_set_fd(c->ssl, fd)) fail("SSL_new");
                        SSL_set_accept_state(c->ssl);
                    }
                    watch(c, EPOLLIN, EPOLL_CTL_ADD);
                }
                continue;
            }
            int h = handshake(c), r = 0;
            if (h == 1) {
                while ((r = get(c, buf, sizeof buf)) > 0) {
                    if (!put(c, answer, FRAME)) {
                        r = -1;
                        break;
                    }
                }
            }
            if (h < 0 || r < 0) {
                drop(c);
                free(c);
            }
        }
    }
}

static void start(conn_t *c) {
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) fail("socket");
    struct sockaddr_in local = loopback(c->source, 0), server = loopback(0x7f000001, port);
    if (bind(c->fd, (struct sockaddr *)&local, sizeof local) < 0) fail("bind");
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS)
        fail("connect");
    c->step = 0;
    c->got = 0;
    c->handshaken = 0;
    if (use_tls) {
        c->ssl = SSL_new(ctx);
        if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) fail("SSL_new");
        SSL_set_connect_state(c->ssl);
    }
    watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_ADD);
}

static int drive(int inflight, double seconds) {
    conn_t *conns = calloc((size_t)inflight, sizeof *conns);
    if (!conns) fail("calloc");
    char buf[16384], request[FRAME];
    memset(request, 'q', sizeof request);
    unsigned long long cycles = 0, failures = 0;
    for (int i = 0; i < inflight; i++) {
        /* 127.x.y.10: one source address per connection, as browsers come from many */
        conns[i].source = 0x7f00000a | (((uint32_t)(i + 1) * 7919u) & 0xffffu) << 8;
        start(&conns[i]);
    }
    double started = now_s(), end = started + seconds;
    while (now_s() < end) {
        struct epoll_event ev[64];
        int k = epoll_wait(epfd, ev, 64, 100);
        for (int i = 0; i < k; i++) {
            conn_t *c = ev[i].data.ptr;
            int ok = 1;
            if (c->step == 0) {
                int h = handshake(c);
                if (h == 0) {
                    /* wait for what OpenSSL waits for, not for a socket always writable */
                    watch(c, c->wants_write ? EPOLLOUT : EPOLLIN, EPOLL_CTL_MOD);
                    continue;
                }
                ok = h == 1 && put(c, request, FRAME);
                if (ok) {
                    c->step = 1;
                    watch(c, EPOLLIN, EPOLL_CTL_MOD);
                }
            } else {
                int r;
                while (ok && (r = get(c, buf, sizeof buf)) != 0) {
                    if (r < 0) {
                        ok = 0;
                        break;
                    }
                    c->got += r;
                    if (c->got < FRAME) continue;
                    c->got = 0;
                    if (c->step == EXCHANGES) {
                        cycles++;
                        if (use_tls) SSL_shutdown(c->ssl);
                        drop(c);
                        start(c);
                        break;
                    }
                    c->step++;
                    ok = put(c, request, FRAME);
                }
            }
            if (!ok) {
                failures++;
                drop(c);
                start(c);
            }
        }
    }
    printf("{\"cycles_ps\":%.1f,\"failures\":%llu}\n", (double)cycles / (now_s() - started),
           failures);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: tls_floor server PORT tcp|tls [CERT KEY]\n"
                        "       tls_floor client PORT tcp|tls INFLIGHT SECONDS\n");
        return 2;
    }
    int server = !strcmp(argv[1], "server");
    port = atoi(argv[2]);
    use_tls = !strcmp(argv[3], "tls");
    epfd = epoll_create1(0);
    if (use_tls) {
        ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
        if (!ctx) fail("SSL_CTX_new");
        if (server) {
            if (argc < 6 || SSL_CTX_use_certificate_chain_file(ctx, argv[4]) != 1 ||
                SSL_CTX_use_PrivateKey_file(ctx, argv[5], SSL_FILETYPE_PEM) != 1) {
                fprintf(stderr, "tls_floor: a certificate and its key are needed\n");
                return 2;
            }
            SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        } else {
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
            SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
            SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
        }
    }
    if (server) serve();
    if (argc < 6) return 2;
    double seconds = atof(argv[5]);
    if (seconds <= 0 || seconds > 60) seconds = 4; /* every run is bounded */
    return drive(atoi(argv[4]), seconds);
}

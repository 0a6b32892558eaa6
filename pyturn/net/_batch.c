/*
 * pyturn.net._batch: many UDP datagrams per system call (recvmmsg/sendmmsg).
 *
 * On loopback the kernel's per-datagram cost dominates a relay, and uvloop makes one
 * recvfrom and one Python callback per datagram. This module lets the I/O layer read a
 * whole queue of datagrams, and write a batch of them, in one call each; and it relays
 * the ChannelData of UDP clients itself, by the core's rules and on the core's own state
 * (the last section). pyturn/net/batch.py has the same functions in pure Python, used
 * when this module could not be built; there Python does all the routing.
 *
 * Frames for one destination go out with UDP GSO when the kernel has it (Linux 4.18+):
 * a run of equal-sized frames (the last may be shorter) becomes one message carrying
 * UDP_SEGMENT, so the stack is walked once for the run and the receiver still gets
 * separate datagrams.
 *
 * Addresses are the tuples the rest of pyturn uses: (host, port) for IPv4 and IPv6 alike
 * (IPv6 flow information and scope are dropped, as the Python listener does).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

/* One read takes at most this many datagrams; each slot holds the largest UDP payload. */
#define BATCH 32
#define SLOT 65536

static unsigned char *rx_buffers;        /* BATCH * SLOT bytes, allocated on first use */
static struct mmsghdr rx_msgs[BATCH];
static struct iovec rx_iov[BATCH];
static struct sockaddr_storage rx_names[BATCH];

static struct mmsghdr tx_msgs[BATCH];
static struct iovec tx_iov[BATCH];
static struct sockaddr_storage tx_names[BATCH];

/* Clients send many datagrams from the same address: reuse its tuple rather than
 * formatting the host string again. Keyed by (IPv4 address << 16 | port); cleared
 * when it grows past CACHE_LIMIT so that address churn cannot grow it without end. */
#define CACHE_LIMIT 65536
static PyObject *ipv4_cache;

static PyObject *
address_tuple(const struct sockaddr_storage *name)
{
    char host[INET6_ADDRSTRLEN];
    if (name->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)name;
        unsigned long long key =
            ((unsigned long long)ntohl(sin->sin_addr.s_addr) << 16) | ntohs(sin->sin_port);
        PyObject *pykey = PyLong_FromUnsignedLongLong(key);
        if (pykey == NULL)
            return NULL;
        PyObject *cached = PyDict_GetItemWithError(ipv4_cache, pykey);
        if (cached != NULL) {
            Py_DECREF(pykey);
            Py_INCREF(cached);
            return cached;
        }
        if (PyErr_Occurred()) {
            Py_DECREF(pykey);
            return NULL;
        }
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
        PyObject *tuple = Py_BuildValue("(si)", host, (int)ntohs(sin->sin_port));
        if (tuple == NULL) {
            Py_DECREF(pykey);
            return NULL;
        }
        if (PyDict_GET_SIZE(ipv4_cache) >= CACHE_LIMIT)
            PyDict_Clear(ipv4_cache);
        if (PyDict_SetItem(ipv4_cache, pykey, tuple) < 0) {
            Py_DECREF(pykey);
            Py_DECREF(tuple);
            return NULL;
        }
        Py_DECREF(pykey);
        return tuple;
    }
    if (name->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)name;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, (int)ntohs(sin6->sin6_port));
    }
    return Py_BuildValue("(si)", "", 0);
}

/* Errors a UDP socket reports for an earlier datagram (ICMP): they consume the error
 * and concern one peer; the next call goes on with the queue. */
static int
is_stale_icmp_error(int err)
{
    return err == ECONNREFUSED || err == EHOSTUNREACH || err == ENETUNREACH ||
           err == EHOSTDOWN || err == ENETDOWN || err == EMSGSIZE;
}

static int
ensure_rx_buffers(void)
{
    if (rx_buffers == NULL) {
        rx_buffers = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (rx_buffers == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

/* One recvmmsg of up to vlen datagrams into the slots, each read `headroom` bytes past
 * the start of its slot (room for a ChannelData header in front of a peer's payload).
 * Tried again after EINTR and after a stale ICMP error (up to 64 of those per caller's
 * *stale_errors); otherwise -1 with errno set. */
static int
receive(int fd, unsigned int vlen, size_t headroom, int *stale_errors)
{
    for (unsigned int i = 0; i < vlen; i++) {
        rx_iov[i].iov_base = rx_buffers + (size_t)i * SLOT + headroom;
        rx_iov[i].iov_len = SLOT - headroom;
        memset(&rx_msgs[i].msg_hdr, 0, sizeof rx_msgs[i].msg_hdr);
        rx_msgs[i].msg_hdr.msg_name = &rx_names[i];
        rx_msgs[i].msg_hdr.msg_namelen = sizeof rx_names[i];
        rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i];
        rx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (;;) {
        int n = recvmmsg(fd, rx_msgs, vlen, MSG_DONTWAIT, NULL);
        if (n >= 0 || !(errno == EINTR ||
                        (is_stale_icmp_error(errno) && ++*stale_errors < 64)))
            return n;
    }
}

/* After receive() failed: the queue is empty (or only stale errors were left), which is
 * the normal end of a read rather than an error to raise. */
static int
nothing_to_read(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || is_stale_icmp_error(err);
}

/* Append (data, (host, port)) of receive slot i to the list out; 0, or -1 on an error. */
static int
append_datagram(PyObject *out, int i)
{
    PyObject *pair = Py_BuildValue(
        "(y#N)", (const char *)rx_iov[i].iov_base, (Py_ssize_t)rx_msgs[i].msg_len,
        address_tuple(&rx_names[i]));
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(out, pair);
    Py_DECREF(pair);
    return rc;
}

/* The (sock, limit, ...) head of the readers' arguments: 0, or -1 with an exception. */
static int
socket_and_limit(PyObject *const *args, int *fd, Py_ssize_t *limit)
{
    *fd = PyObject_AsFileDescriptor(args[0]);
    if (*fd < 0)
        return -1;
    *limit = PyLong_AsSsize_t(args[1]);
    if (*limit < 0 && PyErr_Occurred())
        return -1;
    return 0;
}

PyDoc_STRVAR(recv_batch_doc,
"recv_batch(sock, limit) -> list[tuple[bytes, tuple[str, int]]]\n\n"
"Every datagram queued on the non-blocking socket, up to limit, in one or a few\n"
"recvmmsg calls; an empty list when none is queued.");

static PyObject *
recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_batch(sock, limit)");
        return NULL;
    }
    int fd;
    Py_ssize_t limit;
    if (socket_and_limit(args, &fd, &limit) < 0)
        return NULL;
    if (ensure_rx_buffers() < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    int stale_errors = 0;
    while (PyList_GET_SIZE(out) < limit) {
        Py_ssize_t want = limit - PyList_GET_SIZE(out);
        unsigned int vlen = want > BATCH ? BATCH : (unsigned int)want;
        int n = receive(fd, vlen, 0, &stale_errors);
        if (n < 0) {
            /* Hand over what was read; an error comes back on the next call. */
            int err = errno;
            if (nothing_to_read(err) || PyList_GET_SIZE(out) > 0)
                break;
            Py_DECREF(out); /* may reach free(), which may set errno */
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {
            if (rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                continue; /* larger than any UDP payload: cannot happen, never relayed */
            if (append_datagram(out, i) < 0)
                goto fail;
        }
        if ((unsigned int)n < vlen)
            break; /* the queue is empty */
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* Fill `name` from a (host, port[, ...]) tuple; 0 on success, -1 with an exception. */
static int
parse_address(PyObject *addr, struct sockaddr_storage *name, socklen_t *namelen)
{
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) < 2) {
        PyErr_SetString(PyExc_TypeError, "an address is a (host, port) tuple");
        return -1;
    }
    const char *host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(addr, 0));
    if (host == NULL)
        return -1;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(name, 0, sizeof *name);
    if (strchr(host, ':') == NULL) {
        struct sockaddr_in *sin = (struct sockaddr_in *)name;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            goto bad_host;
        *namelen = sizeof *sin;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)name;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            goto bad_host;
        *namelen = sizeof *sin6;
    }
    return 0;
bad_host:
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %R", PyTuple_GET_ITEM(addr, 0));
    return -1;
}

/* GSO: at most this many segments (the kernel's UDP_MAX_SEGMENTS) and bytes per run. */
#define GSO_SEGMENTS 64
#define GSO_BYTES 65000
#define MANY_MAX 512 /* frames prepared per round of send_many_to */

/* Cleared for good when the kernel or the route refuses UDP_SEGMENT (EIO: no checksum
 * offload on the way out; ENOPROTOOPT, EOPNOTSUPP: an older kernel). */
static int gso_enabled = 1;

static struct iovec many_iov[MANY_MAX];
static union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} many_cmsg[BATCH];
static unsigned int many_frames[BATCH]; /* frames in each prepared message */

static int
send_one_by_one(int fd, struct iovec *iov, unsigned int count,
                const void *name, socklen_t namelen)
{
    int sent = 0;
    for (unsigned int k = 0; k < count; k++) {
        if (sendto(fd, iov[k].iov_base, iov[k].iov_len, MSG_DONTWAIT,
                   (const struct sockaddr *)name, namelen) >= 0)
            sent++;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
    }
    return sent;
}

/* sendmmsg the first `count` messages of tx_msgs; message i carries frames[i] datagrams
 * (one each when frames is NULL). Returns how many datagrams went out. When the socket
 * buffer fills up (or worse) it sets *full: the caller drops the rest, as UDP would
 * anyway. A datagram the kernel refuses (an ICMP error left by an earlier one, a
 * forbidden destination) is skipped; a refused GSO message goes out datagram by
 * datagram. */
static Py_ssize_t
send_prepared(int fd, unsigned int count, const unsigned int *frames, int *full)
{
    unsigned int done = 0;
    Py_ssize_t sent = 0;
    while (done < count) {
        int n = sendmmsg(fd, tx_msgs + done, count - done, MSG_DONTWAIT);
        if (n > 0) {
            for (int k = 0; k < n; k++)
                sent += frames != NULL ? frames[done + (unsigned int)k] : 1;
            done += (unsigned int)n;
            continue;
        }
        int err = errno;
        if (n < 0 && err == EINTR)
            continue;
        if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK))
            break;
        struct msghdr *h = &tx_msgs[done].msg_hdr;
        if (n < 0 && h->msg_controllen != 0) {
            /* The kernel refused the GSO message (no offload on the route, a segment
             * above the MTU, an old kernel): send its frames one by one instead. */
            if (err == EIO || err == ENOPROTOOPT || err == EOPNOTSUPP)
                gso_enabled = 0;
            sent += send_one_by_one(fd, h->msg_iov, (unsigned int)h->msg_iovlen,
                                    h->msg_name, h->msg_namelen);
            done++;
            continue;
        }
        if (n < 0 && (is_stale_icmp_error(err) || err == EACCES || err == EPERM ||
                      err == EINVAL || err == EAFNOSUPPORT || err == EADDRNOTAVAIL)) {
            done++; /* this one datagram cannot go; the others may */
            continue;
        }
        break; /* worse: drop what is left */
    }
    *full = done < count;
    return sent;
}

static void
prepare(unsigned int i, PyObject *data, struct sockaddr_storage *name, socklen_t namelen)
{
    tx_iov[i].iov_base = PyBytes_AS_STRING(data);
    tx_iov[i].iov_len = (size_t)PyBytes_GET_SIZE(data);
    memset(&tx_msgs[i].msg_hdr, 0, sizeof tx_msgs[i].msg_hdr);
    tx_msgs[i].msg_hdr.msg_name = name;
    tx_msgs[i].msg_hdr.msg_namelen = namelen;
    tx_msgs[i].msg_hdr.msg_iov = &tx_iov[i];
    tx_msgs[i].msg_hdr.msg_iovlen = 1;
}

PyDoc_STRVAR(send_batch_doc,
"send_batch(sock, items) -> int\n\n"
"Send each (data, (host, port)) of the list items, in sendmmsg calls of up to 32;\n"
"returns how many went out. Datagrams the socket cannot take now are dropped.");

static PyObject *
send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_batch(sock, items: list)");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    PyObject *items = args[1];
    Py_ssize_t total = PyList_GET_SIZE(items), sent = 0;
    for (Py_ssize_t start = 0; start < total; start += BATCH) {
        unsigned int count = 0;
        for (Py_ssize_t j = start; j < total && count < BATCH; j++, count++) {
            PyObject *item = PyList_GET_ITEM(items, j);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
                !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
                PyErr_SetString(PyExc_TypeError, "items are (bytes, address) pairs");
                return NULL;
            }
            socklen_t namelen;
            if (parse_address(PyTuple_GET_ITEM(item, 1), &tx_names[count], &namelen) < 0)
                return NULL;
            prepare(count, PyTuple_GET_ITEM(item, 0), &tx_names[count], namelen);
        }
        int full;
        sent += send_prepared(fd, count, NULL, &full);
        if (full)
            break;
    }
    return PyLong_FromSsize_t(sent);
}

/* Send `total` frames to one address: UDP GSO for runs of equal-sized frames (the last
 * of a run may be shorter), sendmmsg for the rest. Returns how many datagrams went out;
 * *full is set when the socket could not take them all (the rest are dropped). */
static Py_ssize_t
send_runs(int fd, const struct sockaddr_storage *name, socklen_t namelen,
          const struct iovec *frames, Py_ssize_t total, int *full)
{
    Py_ssize_t next = 0, sent = 0;
    *full = 0;
    while (next < total) {
        /* Prepare up to BATCH messages from up to MANY_MAX frames. */
        unsigned int used = 0, messages = 0;
        while (next < total && messages < BATCH && used < MANY_MAX) {
            size_t size = frames[next].iov_len;
            unsigned int start = used, run = 0;
            size_t bytes = 0;
            while (next < total && used < MANY_MAX) {
                size_t len = frames[next].iov_len;
                /* An empty frame never joins a run: as its last segment it would vanish. */
                if (run > 0 && (!gso_enabled || size == 0 || len == 0 || len > size ||
                                run == GSO_SEGMENTS || bytes + len > GSO_BYTES))
                    break;
                many_iov[used] = frames[next];
                used++, run++, next++;
                bytes += len;
                if (len < size)
                    break; /* a shorter segment can only be the last of a run */
            }
            struct msghdr *h = &tx_msgs[messages].msg_hdr;
            memset(h, 0, sizeof *h);
            h->msg_name = (void *)name;
            h->msg_namelen = namelen;
            h->msg_iov = &many_iov[start];
            h->msg_iovlen = run;
            if (run > 1) {
                h->msg_control = many_cmsg[messages].buf;
                h->msg_controllen = sizeof many_cmsg[messages].buf;
                struct cmsghdr *c = CMSG_FIRSTHDR(h);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t segment = (uint16_t)size;
                memcpy(CMSG_DATA(c), &segment, sizeof segment);
            }
            many_frames[messages] = run;
            messages++;
        }
        sent += send_prepared(fd, messages, many_frames, full);
        if (*full)
            break;
    }
    return sent;
}

PyDoc_STRVAR(send_many_to_doc,
"send_many_to(sock, address, frames) -> int\n\n"
"Send every bytes object of the list frames to one (host, port), with UDP GSO for runs\n"
"of equal-sized frames and sendmmsg for the rest; returns how many datagrams went out.\n"
"Datagrams the socket cannot take now are dropped.");

static PyObject *
send_many_to(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "send_many_to(sock, address, frames: list)");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    struct sockaddr_storage name;
    socklen_t namelen;
    if (parse_address(args[1], &name, &namelen) < 0)
        return NULL;
    PyObject *frames = args[2];
    Py_ssize_t total = PyList_GET_SIZE(frames), sent = 0;
    for (Py_ssize_t j = 0; j < total; j++) {
        if (!PyBytes_Check(PyList_GET_ITEM(frames, j))) {
            PyErr_SetString(PyExc_TypeError, "frames are bytes");
            return NULL;
        }
    }
    static struct iovec chunk[MANY_MAX];
    for (Py_ssize_t start = 0; start < total; start += MANY_MAX) {
        Py_ssize_t count = total - start < MANY_MAX ? total - start : MANY_MAX;
        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *frame = PyList_GET_ITEM(frames, start + k);
            chunk[k].iov_base = PyBytes_AS_STRING(frame);
            chunk[k].iov_len = (size_t)PyBytes_GET_SIZE(frame);
        }
        int full;
        sent += send_runs(fd, &name, namelen, chunk, count, &full);
        if (full)
            break;
    }
    return PyLong_FromSsize_t(sent);
}

/* ---------------------------------------------------------------------------------------
 * The ChannelData fast path, both directions, for UDP clients.
 *
 * At a moderate rate every datagram wakes the process alone, and the Python code around
 * one datagram costs as much as the two system calls; so the commonest case is served
 * here, reading the core's own state (nothing is copied, so nothing can go stale):
 * TurnServer.allocations, and on an Allocation `channel_peers`, `channel_headers`,
 * `permissions`, `relay`, `relay6` and the four traffic counters (see
 * pyturn/core/allocation.py). The rules are those of TurnServer.route_channel_data and
 * Allocation.frame_for_client; anything outside the common case is handed back to
 * them, which stay the reference.
 */

static PyObject *s_udp, *s_channel_peers, *s_channel_headers, *s_permissions, *s_relay,
    *s_relay6, *s_sock, *s_allocation, *s_udp_target, *s_frame_for_client,
    *s_packets_to_peer, *s_bytes_to_peer, *s_packets_to_client, *s_bytes_to_client,
    *s_allocations, *s_readable, *s_fileno;

static int
intern_names(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_udp, "udp"}, {&s_channel_peers, "channel_peers"},
        {&s_channel_headers, "channel_headers"}, {&s_permissions, "permissions"},
        {&s_relay, "relay"}, {&s_relay6, "relay6"}, {&s_sock, "sock"},
        {&s_allocation, "allocation"}, {&s_udp_target, "udp_target"},
        {&s_frame_for_client, "frame_for_client"},
        {&s_packets_to_peer, "packets_to_peer"}, {&s_bytes_to_peer, "bytes_to_peer"},
        {&s_packets_to_client, "packets_to_client"},
        {&s_bytes_to_client, "bytes_to_client"}, {&s_allocations, "allocations"},
        {&s_readable, "readable"}, {&s_fileno, "fileno"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return -1;
    }
    return 0;
}

/* obj.name += amount */
static int
add_to(PyObject *obj, PyObject *name, Py_ssize_t amount)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    PyObject *delta = PyLong_FromSsize_t(amount);
    if (delta == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyObject *sum = PyNumber_Add(value, delta);
    Py_DECREF(value);
    Py_DECREF(delta);
    if (sum == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* PyObject_AsFileDescriptor without its bound method object: this runs per datagram. */
static int
fd_of(PyObject *sock)
{
    if (PyLong_Check(sock))
        return PyObject_AsFileDescriptor(sock);
    PyObject *number = PyObject_CallMethodNoArgs(sock, s_fileno);
    if (number == NULL)
        return -1;
    int fd = PyObject_AsFileDescriptor(number);
    Py_DECREF(number);
    return fd;
}

/* The int objects of channel numbers 0x4000-0x7FFF, made once each: a per-datagram
 * allocation less on the relay path. */
static PyObject *channel_numbers[0x4000];

static PyObject *
channel_number(unsigned int number)
{
    if (number < 0x4000 || number > 0x7FFF)
        return PyLong_FromUnsignedLong(number);
    PyObject **slot = &channel_numbers[number - 0x4000];
    if (*slot == NULL && (*slot = PyLong_FromUnsignedLong(number)) == NULL)
        return NULL;
    Py_INCREF(*slot);
    return *slot;
}

static int
same_address(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}

/* A payload on its way to a peer: a slice of a receive slot. */
struct forward {
    int fd;
    socklen_t namelen;
    struct sockaddr_storage name;
    struct iovec payload;
    int sent;
};

static struct forward forwards[BATCH];

/* TurnServer.route_channel_data for one datagram from a UDP client: 1 when it is queued
 * in *f (counters counted), 0 when Python must look at it, -1 on an error. */
static int
route_channel_data(const unsigned char *b, size_t len, const struct sockaddr_storage *from,
                   PyObject *allocations, PyObject *local, struct forward *f)
{
    PyObject *client = address_tuple(from);
    if (client == NULL)
        return -1;
    PyObject *key = PyTuple_Pack(3, s_udp, client, local);
    Py_DECREF(client);
    if (key == NULL)
        return -1;
    PyObject *allocation = PyDict_GetItemWithError(allocations, key);
    Py_DECREF(key);
    if (allocation == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(allocation);
    int result = 0;
    PyObject *peers = NULL, *number = NULL, *relay = NULL, *sock = NULL;
    peers = PyObject_GetAttr(allocation, s_channel_peers);
    if (peers == NULL || !PyDict_Check(peers))
        goto python;
    number = channel_number(((unsigned int)b[0] << 8) | b[1]);
    if (number == NULL)
        goto error;
    PyObject *peer = PyDict_GetItemWithError(peers, number); /* borrowed from peers */
    if (peer == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    size_t end = 4 + (((size_t)b[2] << 8) | b[3]);
    if (end > len)
        goto done;
    if (parse_address(peer, &f->name, &f->namelen) < 0)
        goto python;
    /* Allocation.relay_for: an IPv6 peer of a dual-stack allocation uses relay6. */
    relay = PyObject_GetAttr(allocation, s_relay6);
    if (relay == NULL)
        goto python;
    if (relay == Py_None || f->name.ss_family != AF_INET6) {
        Py_DECREF(relay);
        relay = PyObject_GetAttr(allocation, s_relay);
        if (relay == NULL)
            goto python;
    }
    sock = PyObject_GetAttr(relay, s_sock);
    if (sock == NULL)
        goto python;
    f->fd = fd_of(sock);
    if (f->fd < 0)
        goto python;
    if (add_to(allocation, s_packets_to_peer, 1) < 0 ||
        add_to(allocation, s_bytes_to_peer, (Py_ssize_t)(end - 4)) < 0)
        goto error;
    f->payload.iov_base = (void *)(b + 4);
    f->payload.iov_len = end - 4;
    f->sent = 0;
    result = 1;
    goto done;
python: /* not the common case (a relay without a socket, an odd peer): Python decides */
    PyErr_Clear();
    result = 0;
    goto done;
error:
    result = -1;
done:
    Py_XDECREF(peers);
    Py_XDECREF(number);
    Py_XDECREF(relay);
    Py_XDECREF(sock);
    Py_DECREF(allocation);
    return result;
}

/* Send the queued payloads, one send_runs per (relay socket, peer) in arrival order. */
static void
flush_forwards(int count)
{
    struct iovec frames[BATCH];
    for (int i = 0; i < count; i++) {
        if (forwards[i].sent)
            continue;
        Py_ssize_t k = 0;
        for (int j = i; j < count; j++) {
            struct forward *f = &forwards[j];
            if (!f->sent && f->fd == forwards[i].fd && same_address(&f->name, &forwards[i].name)) {
                frames[k++] = f->payload;
                f->sent = 1;
            }
        }
        int full;
        send_runs(forwards[i].fd, &forwards[i].name, forwards[i].namelen, frames, k, &full);
    }
}

PyDoc_STRVAR(forward_channel_data_doc,
"forward_channel_data(sock, limit, allocations, local) -> tuple[int, list[Datagram]]\n\n"
"Read up to limit datagrams from a UDP client listener bound to local, as recv_batch\n"
"does, and relay the ChannelData of bound channels to their peers at once (what\n"
"TurnServer.route_channel_data would do, counters included). Returns how many\n"
"datagrams were read and the (data, client) pairs left for Python, in their order. Once\n"
"a client has a datagram left for Python, its later ones in the batch are left too, and\n"
"no more is read before Python has seen them, so that each client's datagrams take\n"
"effect in the order they came.");

/* Clients with a datagram left for Python during one forward(): their later ChannelData
 * is left for Python too, since it may depend on what Python has not seen yet (a Refresh
 * that ends the allocation), and a client's datagrams must take effect in order. */
#define DEFERRED_MAX 256
static struct sockaddr_storage deferred[DEFERRED_MAX];
static int ndeferred;

static int
is_deferred(const struct sockaddr_storage *client)
{
    for (int d = 0; d < ndeferred; d++)
        if (same_address(&deferred[d], client))
            return 1;
    return 0;
}

/* 0, or -1 when there is no room left to remember the client. */
static int
defer(const struct sockaddr_storage *client)
{
    if (ndeferred == DEFERRED_MAX)
        return -1;
    deferred[ndeferred++] = *client;
    return 0;
}

/* forward_channel_data on a descriptor: sets *received, and *left to a list of what was
 * left for Python, or to NULL when nothing was (no list is made for a wake-up served
 * here entirely). 0, or -1 with an exception. */
static int
forward(int fd, Py_ssize_t limit, PyObject *allocations, PyObject *local,
        Py_ssize_t *received_out, PyObject **left)
{
    *left = NULL;
    *received_out = 0;
    if (ensure_rx_buffers() < 0)
        return -1;
    Py_ssize_t received = 0;
    int stale_errors = 0, full_of_deferred = 0;
    ndeferred = 0;
    while (received < limit) {
        unsigned int vlen = limit - received > BATCH ? BATCH : (unsigned int)(limit - received);
        int n = receive(fd, vlen, 0, &stale_errors);
        if (n < 0) {
            if (nothing_to_read(errno) || received)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        received += n;
        int queued = 0;
        for (int i = 0; i < n; i++) {
            if (rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                continue;
            const unsigned char *b = rx_iov[i].iov_base;
            size_t len = rx_msgs[i].msg_len;
            int waits = is_deferred(&rx_names[i]);
            if (len >= 4 && b[0] >= 0x40 && b[0] <= 0x7F) {
                if (!waits) {
                    int routed = route_channel_data(b, len, &rx_names[i], allocations, local,
                                                    &forwards[queued]);
                    if (routed < 0)
                        goto fail;
                    if (routed) {
                        queued++;
                        continue;
                    }
                }
            }
            if (!waits && defer(&rx_names[i]) < 0)
                full_of_deferred = 1;
            if (*left == NULL && (*left = PyList_New(0)) == NULL)
                goto fail;
            if (append_datagram(*left, i) < 0)
                goto fail;
        }
        flush_forwards(queued);
        /* Past DEFERRED_MAX clients the next one could not be held back: stop here. */
        if ((unsigned int)n < vlen || full_of_deferred)
            break;
        continue;
fail:
        flush_forwards(queued);
        Py_CLEAR(*left);
        return -1;
    }
    *received_out = received;
    return 0;
}

static PyObject *
forward_channel_data(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[2]) || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "forward_channel_data(sock, limit, allocations: dict, local: tuple)");
        return NULL;
    }
    int fd;
    Py_ssize_t limit;
    if (socket_and_limit(args, &fd, &limit) < 0)
        return NULL;
    Py_ssize_t received;
    PyObject *left;
    if (forward(fd, limit, args[2], args[3], &received, &left) < 0)
        return NULL;
    if (left == NULL && (left = PyList_New(0)) == NULL)
        return NULL;
    return Py_BuildValue("(nN)", received, left);
}

PyDoc_STRVAR(listener_ready_doc,
"listener_ready(sock, limit, server, local, handle, failed) -> None\n\n"
"The event loop's callback for a UDP client listener, so that a wake-up the native path\n"
"serves runs no Python: forward_channel_data(sock, limit, server.allocations, local),\n"
"then handle(received, left) when datagrams were left for Python or the limit was\n"
"reached, or failed(exc) when reading raised an OSError.");

static PyObject *
listener_ready(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "listener_ready(sock, limit, server, local, handle, failed)");
        return NULL;
    }
    int fd;
    Py_ssize_t limit;
    if (socket_and_limit(args, &fd, &limit) < 0)
        return NULL;
    PyObject *allocations = PyObject_GetAttr(args[2], s_allocations);
    if (allocations == NULL)
        return NULL;
    Py_ssize_t received = 0;
    PyObject *left = NULL;
    int rc = -1;
    if (!PyDict_Check(allocations))
        PyErr_SetString(PyExc_TypeError, "server.allocations is not a dict");
    else
        rc = forward(fd, limit, allocations, args[3], &received, &left);
    Py_DECREF(allocations);
    if (rc < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OSError))
            return NULL;
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        PyObject *done = PyObject_CallOneArg(args[5], value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return done;
    }
    if (left == NULL && received < limit)
        Py_RETURN_NONE; /* all of it relayed here: the common case */
    if (left == NULL && (left = PyList_New(0)) == NULL)
        return NULL;
    PyObject *count = PyLong_FromSsize_t(received);
    PyObject *done = count == NULL ? NULL
                                   : PyObject_CallFunctionObjArgs(args[4], count, left, NULL);
    Py_XDECREF(count);
    Py_DECREF(left);
    return done;
}

/* Allocation.frame_for_client for every datagram queued on one relay socket whose client
 * is on UDP, sent to the client as soon as read: 1 when served, 0 when the endpoint is
 * Python's (no UDP client, not attached yet), -1 on an error. */
static int
serve_endpoint(PyObject *endpoint, int fd, Py_ssize_t reads)
{
    PyObject *target = PyObject_GetAttr(endpoint, s_udp_target);
    if (target == NULL)
        return -1;
    PyObject *allocation = NULL, *permissions = NULL, *headers = NULL, *made = NULL;
    int result = 0;
    if (target == Py_None || !PyTuple_Check(target) || PyTuple_GET_SIZE(target) != 2)
        goto done;
    allocation = PyObject_GetAttr(endpoint, s_allocation);
    if (allocation == NULL)
        goto error;
    if (allocation == Py_None)
        goto done;
    permissions = PyObject_GetAttr(allocation, s_permissions);
    headers = PyObject_GetAttr(allocation, s_channel_headers);
    if (permissions == NULL || headers == NULL)
        goto error;
    if (!PyDict_Check(permissions) || !PyDict_Check(headers))
        goto done;
    int client_fd = fd_of(PyTuple_GET_ITEM(target, 0));
    if (client_fd < 0)
        goto error;
    struct sockaddr_storage client;
    socklen_t client_len;
    if (parse_address(PyTuple_GET_ITEM(target, 1), &client, &client_len) < 0)
        goto error;
    if (ensure_rx_buffers() < 0)
        goto error;
    result = 1;
    Py_ssize_t done_reads = 0;
    int stale_errors = 0;
    while (done_reads < reads) {
        unsigned int vlen = reads - done_reads > BATCH ? BATCH : (unsigned int)(reads - done_reads);
        int n = receive(fd, vlen, 4, &stale_errors); /* room for the ChannelData header */
        if (n < 0)
            break; /* empty, or an error the next wake-up meets again */
        done_reads += n;
        struct iovec frames[BATCH];
        Py_ssize_t count = 0, payload_bytes = 0;
        for (int i = 0; i < n; i++) {
            if (rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                continue;
            unsigned char *b = rx_iov[i].iov_base;
            size_t len = rx_msgs[i].msg_len;
            PyObject *peer = address_tuple(&rx_names[i]);
            if (peer == NULL)
                goto error;
            int permitted = PyDict_Contains(permissions, PyTuple_GET_ITEM(peer, 0));
            PyObject *header = permitted > 0 ? PyDict_GetItemWithError(headers, peer) : NULL;
            if (permitted < 0 || (header == NULL && PyErr_Occurred())) {
                Py_DECREF(peer);
                goto error;
            }
            if (!permitted) {
                Py_DECREF(peer);
                continue; /* RFC 8656 §11.3: no permission, no relaying */
            }
            if (header != NULL && PyBytes_Check(header) && PyBytes_GET_SIZE(header) == 2) {
                const char *h = PyBytes_AS_STRING(header);
                b[-4] = (unsigned char)h[0];
                b[-3] = (unsigned char)h[1];
                b[-2] = (unsigned char)(len >> 8);
                b[-1] = (unsigned char)len;
                frames[count].iov_base = b - 4;
                frames[count].iov_len = len + 4;
            } else {
                PyObject *data = PyBytes_FromStringAndSize((const char *)b, (Py_ssize_t)len);
                PyObject *frame = data == NULL ? NULL : PyObject_CallMethodObjArgs(
                    allocation, s_frame_for_client, peer, data, NULL);
                Py_XDECREF(data);
                if (frame == NULL) {
                    Py_DECREF(peer);
                    goto error;
                }
                if (made == NULL && (made = PyList_New(0)) == NULL) { /* alive until sent */
                    Py_DECREF(frame);
                    Py_DECREF(peer);
                    goto error;
                }
                if (!PyBytes_Check(frame) || PyList_Append(made, frame) < 0) {
                    Py_DECREF(frame);
                    Py_DECREF(peer);
                    if (PyErr_Occurred())
                        goto error;
                    continue; /* None: dropped */
                }
                Py_DECREF(frame);
                frames[count].iov_base = PyBytes_AS_STRING(frame);
                frames[count].iov_len = (size_t)PyBytes_GET_SIZE(frame);
            }
            Py_DECREF(peer);
            count++;
            payload_bytes += (Py_ssize_t)len;
        }
        if (count) {
            if (add_to(allocation, s_packets_to_client, count) < 0 ||
                add_to(allocation, s_bytes_to_client, payload_bytes) < 0)
                goto error;
            int full;
            send_runs(client_fd, &client, client_len, frames, count, &full);
        }
        if ((unsigned int)n < vlen)
            break;
    }
    goto done;
error:
    result = -1;
done:
    Py_DECREF(target);
    Py_XDECREF(allocation);
    Py_XDECREF(permissions);
    Py_XDECREF(headers);
    Py_XDECREF(made);
    return result;
}

#define MAX_EVENTS 256

PyDoc_STRVAR(serve_relays_doc,
"serve_relays(epoll, endpoints, limit, reads) -> list[endpoint]\n\n"
"One epoll_wait (no waiting) on the relay sockets' epoll instance for up to limit\n"
"ready sockets. endpoints maps each registered fd to its RelayEndpoint. Every ready\n"
"endpoint with a UDP client (its udp_target) is served here: up to reads datagrams are\n"
"read and sent to the client as ChannelData or Data indications (what\n"
"Allocation.frame_for_client would make, counters included). Returns the ready\n"
"endpoints left for Python (their readable()).");

static PyObject *
serve_relays(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "serve_relays(epoll, endpoints: dict, limit, reads)");
        return NULL;
    }
    int epfd = PyObject_AsFileDescriptor(args[0]);
    if (epfd < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    Py_ssize_t reads = PyLong_AsSsize_t(args[3]);
    if ((limit < 0 || reads < 0) && PyErr_Occurred())
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(epfd, events, limit > MAX_EVENTS ? MAX_EVENTS : (int)(limit < 1 ? 1 : limit), 0);
    if (n < 0) {
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        n = 0;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *key = PyLong_FromLong(events[i].data.fd);
        if (key == NULL)
            goto fail;
        PyObject *endpoint = PyDict_GetItemWithError(args[1], key);
        Py_DECREF(key);
        if (endpoint == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        Py_INCREF(endpoint);
        int served = serve_endpoint(endpoint, events[i].data.fd, reads);
        if (served == 0 && PyList_Append(out, endpoint) < 0)
            served = -1;
        Py_DECREF(endpoint);
        if (served < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(serve_relay_doc,
"serve_relay(endpoint, reads) -> None\n\n"
"The event loop's callback for a RelayEndpoint it watches itself: served here as by\n"
"serve_relays, or else by the endpoint's readable().");

static PyObject *
serve_relay(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "serve_relay(endpoint, reads)");
        return NULL;
    }
    Py_ssize_t reads = PyLong_AsSsize_t(args[1]);
    if (reads < 0 && PyErr_Occurred())
        return NULL;
    PyObject *sock = PyObject_GetAttr(args[0], s_sock);
    if (sock == NULL)
        return NULL;
    int fd = fd_of(sock);
    Py_DECREF(sock);
    if (fd < 0)
        return NULL;
    int served = serve_endpoint(args[0], fd, reads);
    if (served < 0)
        return NULL;
    if (served == 0)
        return PyObject_CallMethodNoArgs(args[0], s_readable);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(forget_addresses_doc,
"forget_addresses() -> None\n\nEmpty the cache of IPv4 address tuples made by recv_batch.");

static PyObject *
forget_addresses(PyObject *module, PyObject *unused)
{
    PyDict_Clear(ipv4_cache);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gso_doc, "gso() -> bool\n\nWhether UDP GSO is still in use by send_many_to.");

static PyObject *
gso(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(gso_enabled);
}

static PyMethodDef batch_methods[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))recv_batch, METH_FASTCALL, recv_batch_doc},
    {"send_batch", (PyCFunction)(void (*)(void))send_batch, METH_FASTCALL, send_batch_doc},
    {"send_many_to", (PyCFunction)(void (*)(void))send_many_to, METH_FASTCALL,
     send_many_to_doc},
    {"forward_channel_data", (PyCFunction)(void (*)(void))forward_channel_data, METH_FASTCALL,
     forward_channel_data_doc},
    {"listener_ready", (PyCFunction)(void (*)(void))listener_ready, METH_FASTCALL,
     listener_ready_doc},
    {"serve_relays", (PyCFunction)(void (*)(void))serve_relays, METH_FASTCALL,
     serve_relays_doc},
    {"serve_relay", (PyCFunction)(void (*)(void))serve_relay, METH_FASTCALL, serve_relay_doc},
    {"gso", gso, METH_NOARGS, gso_doc},
    {"forget_addresses", forget_addresses, METH_NOARGS, forget_addresses_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef batch_module = {
    PyModuleDef_HEAD_INIT,
    "pyturn.net._batch",
    "recvmmsg/sendmmsg for the UDP relay (see pyturn/net/batch.py).",
    -1,
    batch_methods,
};

PyMODINIT_FUNC
PyInit__batch(void)
{
    ipv4_cache = PyDict_New();
    if (ipv4_cache == NULL || intern_names() < 0)
        return NULL;
    PyObject *module = PyModule_Create(&batch_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "BATCH", BATCH) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

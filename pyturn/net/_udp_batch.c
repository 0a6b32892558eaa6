/*
 * Batched UDP I/O for pyturn.net._batch: many datagrams per system call.
 *
 * On loopback the kernel's per-datagram cost dominates a relay, and uvloop makes one
 * recvfrom and one Python callback per datagram. These functions read a whole queue of
 * datagrams, and write a batch of them, in one call each (recvmmsg/sendmmsg). They know
 * sockets, addresses and bytes, nothing of TURN: the table-driven fast path that uses
 * them is _fastpath.c, and pyturn/net/batch.py has the same functions in pure Python.
 *
 * Frames for one destination go out with UDP GSO when the kernel has it (Linux 4.18+):
 * a run of equal-sized frames (the last may be shorter) becomes one message carrying
 * UDP_SEGMENT, so the stack is walked once for the run and the receiver still gets
 * separate datagrams.
 *
 * Addresses are the tuples the rest of pyturn uses: (host, port) for IPv4 and IPv6 alike
 * (IPv6 flow information and scope are dropped, as the Python listener does).
 */
#include "_udp_batch.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

unsigned char *rx_buffers;        /* BATCH * SLOT bytes, allocated on first use */
struct mmsghdr rx_msgs[BATCH];
struct iovec rx_iov[BATCH];
struct sockaddr_storage rx_names[BATCH];

static struct mmsghdr tx_msgs[BATCH];
static struct iovec tx_iov[BATCH];
static struct sockaddr_storage tx_names[BATCH];

/* Clients send many datagrams from the same address: reuse its tuple rather than
 * formatting the host string again. Keyed by (IPv4 address << 16 | port); cleared
 * when it grows past CACHE_LIMIT so that address churn cannot grow it without end. */
#define CACHE_LIMIT 65536
static PyObject *ipv4_cache;

PyObject *
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

int
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
int
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
int
nothing_to_read(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || is_stale_icmp_error(err);
}

/* Append (data, (host, port)) of receive slot i to the list out; 0, or -1 on an error. */
int
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
int
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
int
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
Py_ssize_t
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


int
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

PyMethodDef udp_batch_methods[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))recv_batch, METH_FASTCALL, recv_batch_doc},
    {"send_batch", (PyCFunction)(void (*)(void))send_batch, METH_FASTCALL, send_batch_doc},
    {"send_many_to", (PyCFunction)(void (*)(void))send_many_to, METH_FASTCALL,
     send_many_to_doc},
    {"gso", gso, METH_NOARGS, gso_doc},
    {"forget_addresses", forget_addresses, METH_NOARGS, forget_addresses_doc},
    {NULL, NULL, 0, NULL},
};

int
udp_batch_init(void)
{
    ipv4_cache = PyDict_New();
    return ipv4_cache == NULL ? -1 : 0;
}

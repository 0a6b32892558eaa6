/*
 * pyturn.net._batch: the batched UDP I/O of _udp_batch.c, and the relay fast path.
 *
 * The fast path relays the ChannelData of UDP clients in both directions, and sends
 * the Data indications of peers without a channel to them, without a round of the event
 * loop. It reads the forwarding table (pyturn/core/forwarding.py) and nothing else: the
 * dictionaries `to_peer_by_channel`, `to_client_by_peer` and `to_client_by_ip`, whose
 * keys and values are plain tuples read here by position, and the I/O layer's map from
 * a UDP listener's local address to its descriptor; a Data indication's bytes come from
 * the table's own function (they need a random transaction ID). The rules are those of
 * ForwardingTable.from_client and ForwardingTable.from_peer, the reference path; what
 * this file does not serve (STUN, Send indications, clients on TCP/TLS) goes back to
 * Python, and tests/net/test_forwarding_differential.py holds the two to the same
 * answers. `is_channel_data` (pyturn/wire/channel_data.py) is the classifier below too.
 *
 * The bandwidth limits are pyturn/core/bandwidth.py's `admit`, below as bandwidth_admit:
 * the rates and the node's buckets are handed over once with set_bandwidth (the node's
 * may be shared with other workers, so they are read and charged atomically).
 */
#include "_udp_batch.h"

#include <time.h>

/* The top two bits of a ChannelData message are 01 (RFC 8656 §12.4). */
#define IS_CHANNEL_DATA(b, len) ((len) >= 1 && (b)[0] >= 0x40 && (b)[0] <= 0x7F)

/* Positions in the table's tuples (see pyturn/core/forwarding.py). */
enum { TO_PEER_RELAY_KEY = 1, TO_PEER_PEER = 2, TO_PEER_COUNTERS = 3, TO_PEER_SIZE = 4 };
enum { TO_CLIENT_HEADER = 0, TO_CLIENT_FLOW = 1, TO_CLIENT_SIZE = 2 };
enum { FLOW_TRANSPORT = 0, FLOW_CLIENT = 1, FLOW_SERVER = 2, FLOW_COUNTERS = 3, FLOW_SIZE = 4 };
/* The counters: an array("Q") of packets and bytes to the peer, then to the client,
 * then the allocation's bandwidth words (pyturn/core/bandwidth.py). */
enum { PACKETS_TO_PEER = 0, PACKETS_TO_CLIENT = 2, COUNTERS_SIZE = 16 };
typedef unsigned long long u64;

static PyObject *s_udp;

/* An allocation's counters, through a view the caller releases: 0, or -1 with an
 * exception. */
static int
counters_view(PyObject *counters, Py_buffer *view)
{
    if (PyObject_GetBuffer(counters, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (view->len < COUNTERS_SIZE * 8 || view->itemsize != 8 || view->format == NULL ||
        strcmp(view->format, "Q") != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "counters are an array('Q') of sixteen");
        return -1;
    }
    return 0;
}

/* counters[index] += packets, counters[index + 1] += bytes: 0, or -1 with an exception. */
static int
add_counts(PyObject *counters, int index, Py_ssize_t packets, Py_ssize_t bytes)
{
    Py_buffer view;
    if (counters_view(counters, &view) < 0)
        return -1;
    u64 *c = view.buf;
    c[index] += (u64)packets;
    c[index + 1] += (u64)bytes;
    PyBuffer_Release(&view);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Bandwidth: bandwidth.py's admit, count_drop and layout.
 */

#define BURST_NS 200000000ULL
#define NS_PER_SECOND 1000000000ULL
enum { TO_PEER = 0, TO_CLIENT = 1 };
enum { ADMITTED = 0, PER_ALLOCATION = 1, PER_USER = 2, TOTAL = 3 };
enum { TAT = 4, USER_BUCKET = 6, SEEN_WINDOW = 7, DROPPED = 8, FAIR_TAT = 14 };
enum { BUCKET_WORDS = 4, LAST_DROP = 2, SENDING = 4, COUNT_BITS = 24 };
#define WINDOW_NS NS_PER_SECOND
#define COUNT_MASK ((1ULL << COUNT_BITS) - 1)

static u64
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * NS_PER_SECOND + (u64)ts.tv_nsec;
}

static u64
charged(u64 tat, u64 now, size_t size, u64 rate)
{
    return (tat > now ? tat : now) + (u64)size * NS_PER_SECOND / rate;
}

/* A node bucket may be another worker's at the same moment: compare and swap. */
static void
charge_shared(u64 *word, u64 now, size_t size, u64 rate)
{
    u64 old = __atomic_load_n(word, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(word, &old, charged(old, now, size, rate), 1,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/* bandwidth.sending: the allocations counted in the window before now's, or so far in
 * now's if more, once this one (counters c) is counted in now's (at least 1). The
 * node's words need SENDING + 2. */
static u64
sending(u64 *c, u64 *buckets, u64 now)
{
    u64 window = now / WINDOW_NS;
    u64 *word = &buckets[SENDING + (window & 1)];
    u64 current = __atomic_load_n(word, __ATOMIC_RELAXED);
    if (c[SEEN_WINDOW] != window) {
        c[SEEN_WINDOW] = window;
        u64 count, next;
        do {
            count = (current >> COUNT_BITS) == window ? (current & COUNT_MASK) + 1 : 1;
            next = (window << COUNT_BITS) | count;
        } while (!__atomic_compare_exchange_n(word, &current, next, 1, __ATOMIC_RELAXED,
                                              __ATOMIC_RELAXED));
        current = next;
    }
    u64 so_far = (current >> COUNT_BITS) == window ? current & COUNT_MASK : 0;
    u64 before = __atomic_load_n(&buckets[SENDING + ((window - 1) & 1)], __ATOMIC_RELAXED);
    u64 n = (before >> COUNT_BITS) == window - 1 ? before & COUNT_MASK : 0;
    if (so_far > n)
        n = so_far;
    return n ? n : 1;
}

/* bandwidth.admit on raw words: `nwords` node words at `buckets`. */
static int
bandwidth_admit(u64 *c, const u64 *rates, u64 *buckets, Py_ssize_t nwords, int direction,
                size_t size, u64 now)
{
    u64 per_allocation = rates[0], per_user = rates[1], total = rates[2];
    u64 tolerance = now + BURST_NS;
    if (per_allocation && c[TAT + direction] > tolerance)
        return PER_ALLOCATION;
    u64 user = c[USER_BUCKET] * BUCKET_WORDS + (u64)direction;
    int has_user = per_user && c[USER_BUCKET] != 0 && user < (u64)nwords;
    if (has_user && __atomic_load_n(&buckets[user], __ATOMIC_RELAXED) > tolerance)
        return PER_USER;
    int has_total = total && nwords >= SENDING + 2;
    u64 fair = 0;
    if (has_total) {
        fair = total / sending(c, buckets, now);
        if (fair == 0)
            fair = 1;
        /* Over its fair share, an allocation gets only the first half of the burst. */
        u64 limit = c[FAIR_TAT + direction] <= tolerance ? tolerance : now + BURST_NS / 2;
        if (__atomic_load_n(&buckets[direction], __ATOMIC_RELAXED) > limit)
            return TOTAL;
    }
    if (per_allocation)
        c[TAT + direction] = charged(c[TAT + direction], now, size, per_allocation);
    if (has_user)
        charge_shared(&buckets[user], now, size, per_user);
    if (has_total) {
        charge_shared(&buckets[direction], now, size, total);
        c[FAIR_TAT + direction] = charged(c[FAIR_TAT + direction], now, size, fair);
    }
    return ADMITTED;
}

static void
bandwidth_count_drop(u64 *c, u64 *buckets, Py_ssize_t nwords, int direction, int reason,
                     size_t size, u64 now)
{
    c[DROPPED + 3 * direction + reason - 1] += (u64)size;
    if (reason == TOTAL && nwords > LAST_DROP)
        __atomic_store_n(&buckets[LAST_DROP], now, __ATOMIC_RELAXED);
}

/* The table's rates and node buckets, held from set_bandwidth on. */
static Py_buffer bw_rates, bw_buckets;
static int bw_set;

/* Whether any limit is set: the fast path's one test when none is. */
static int
bandwidth_limited(void)
{
    if (!bw_set)
        return 0;
    const u64 *r = bw_rates.buf;
    return (r[0] | r[1] | r[2]) != 0;
}

/* The limits for `size` bytes of the allocation with `counters` going `direction`,
 * and, when they pass and `count` is set, the packet counted: 1 when they pass
 * (charged), 0 when dropped (counted as such), -1 with an exception. */
static int
pass_limits(PyObject *counters, int direction, size_t size, u64 now, int count)
{
    Py_buffer view;
    if (counters_view(counters, &view) < 0)
        return -1;
    u64 *c = view.buf;
    int reason = ADMITTED;
    if (bandwidth_limited()) {
        u64 *buckets = bw_buckets.buf;
        Py_ssize_t nwords = bw_buckets.len / 8;
        reason = bandwidth_admit(c, bw_rates.buf, buckets, nwords, direction, size, now);
        if (reason != ADMITTED)
            bandwidth_count_drop(c, buckets, nwords, direction, reason, size, now);
    }
    if (reason == ADMITTED && count) {
        int packets = direction == TO_PEER ? PACKETS_TO_PEER : PACKETS_TO_CLIENT;
        c[packets] += 1;
        c[packets + 1] += (u64)size;
    }
    PyBuffer_Release(&view);
    return reason == ADMITTED;
}

/* A writable buffer of 64-bit words (at least `min` of them): 0, or -1 with an exception. */
static int
words_view(PyObject *obj, Py_buffer *view, Py_ssize_t min, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len < min * 8 || view->len % 8 != 0 || ((uintptr_t)view->buf & 7) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: a buffer of at least %zd aligned 64-bit words",
                     what, min);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(set_bandwidth_doc,
"set_bandwidth(rates, buckets) -> None\n\n"
"The bandwidth limits the fast path applies from now on: rates, the table's three\n"
"words (per_allocation, per_user, total bytes/s), and buckets, the node's bucket words\n"
"(pyturn/core/bandwidth.py). Both are read in place, so writes to them apply at once.");

static PyObject *
set_bandwidth(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_bandwidth(rates, buckets)");
        return NULL;
    }
    Py_buffer rates, buckets;
    if (words_view(args[0], &rates, 3, "rates") < 0)
        return NULL;
    if (words_view(args[1], &buckets, 2 * BUCKET_WORDS, "buckets") < 0) {
        PyBuffer_Release(&rates);
        return NULL;
    }
    if (bw_set) {
        PyBuffer_Release(&bw_rates);
        PyBuffer_Release(&bw_buckets);
    }
    bw_rates = rates;
    bw_buckets = buckets;
    bw_set = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(admit_doc,
"admit(counters, rates, buckets, direction, size, now) -> int\n\n"
"pyturn.core.bandwidth.admit, with the node's buckets read and charged atomically.");

static PyObject *
admit(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "admit(counters, rates, buckets, direction, size, now)");
        return NULL;
    }
    long direction = PyLong_AsLong(args[3]);
    Py_ssize_t size = PyLong_AsSsize_t(args[4]);
    u64 now = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if ((direction != TO_PEER && direction != TO_CLIENT) || size < 0) {
        PyErr_SetString(PyExc_ValueError, "a direction is 0 or 1, a size is not negative");
        return NULL;
    }
    Py_buffer counters, rates, buckets;
    if (counters_view(args[0], &counters) < 0)
        return NULL;
    if (words_view(args[1], &rates, 3, "rates") < 0) {
        PyBuffer_Release(&counters);
        return NULL;
    }
    if (words_view(args[2], &buckets, 0, "buckets") < 0) {
        PyBuffer_Release(&counters);
        PyBuffer_Release(&rates);
        return NULL;
    }
    int reason = bandwidth_admit(counters.buf, rates.buf, buckets.buf, buckets.len / 8,
                                 (int)direction, (size_t)size, now);
    PyBuffer_Release(&counters);
    PyBuffer_Release(&rates);
    PyBuffer_Release(&buckets);
    return PyLong_FromLong(reason);
}

/* An item of a table tuple of `size` items, borrowed; NULL with TypeError otherwise. */
static PyObject *
item(PyObject *tuple, Py_ssize_t size, Py_ssize_t index)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != size) {
        PyErr_SetString(PyExc_TypeError, "not a forwarding table entry");
        return NULL;
    }
    return PyTuple_GET_ITEM(tuple, index);
}

/* The int objects of channel numbers 0x4000-0x7FFF, made once each: a per-datagram
 * allocation less on the relay path. New reference. */
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

/* ---------------------------------------------------------------------------------------
 * Client -> peer: ForwardingTable.from_client.
 */

/* A payload on its way to a peer: a slice of a receive slot. */
struct forward {
    int fd;
    socklen_t namelen;
    struct sockaddr_storage name;
    struct iovec payload;
    int sent;
};

static struct forward forwards[BATCH];

/* Route one ChannelData message (b, len) from client `client` of the listener bound to
 * `local` over `transport` at `now`: 1 when its payload is described in *f and counted,
 * 2 when it is over a bandwidth limit (dropped here, and counted), 0 when it has no route
 * (no such channel, a length past the message: the reference path drops it), -1 on an
 * error. */
static int
route_from_client(PyObject *transport, const unsigned char *b, size_t len, PyObject *client,
                  PyObject *to_peer, PyObject *local, u64 now, struct forward *f)
{
    if (len < 4)
        return 0;
    PyObject *number = channel_number(((unsigned int)b[0] << 8) | b[1]);
    if (number == NULL)
        return -1;
    PyObject *key = PyTuple_Pack(4, transport, client, local, number);
    Py_DECREF(number);
    if (key == NULL)
        return -1;
    PyObject *route = PyDict_GetItemWithError(to_peer, key); /* borrowed */
    Py_DECREF(key);
    if (route == NULL)
        return PyErr_Occurred() ? -1 : 0;
    size_t end = 4 + (((size_t)b[2] << 8) | b[3]);
    if (end > len)
        return 0;
    PyObject *relay_key = item(route, TO_PEER_SIZE, TO_PEER_RELAY_KEY);
    if (relay_key == NULL)
        return -1;
    f->fd = (int)PyLong_AsLong(relay_key);
    if (f->fd == -1 && PyErr_Occurred())
        return -1;
    if (parse_address(PyTuple_GET_ITEM(route, TO_PEER_PEER), &f->name, &f->namelen) < 0)
        return -1;
    int passed = pass_limits(PyTuple_GET_ITEM(route, TO_PEER_COUNTERS), TO_PEER, end - 4, now, 1);
    if (passed <= 0)
        return passed < 0 ? -1 : 2;
    f->payload.iov_base = (void *)(b + 4);
    f->payload.iov_len = end - 4;
    f->sent = 0;
    return 1;
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

/* Clients with a datagram left for Python during one forward(): their later ChannelData
 * is left for Python too, since it may depend on what Python has not seen yet (a
 * ChannelBind, a Refresh that ends the allocation), and a client's datagrams must take
 * effect in order. */
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
forward(int fd, Py_ssize_t limit, PyObject *to_peer, PyObject *local,
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
        u64 now = monotonic_ns();
        for (int i = 0; i < n; i++) {
            if (rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                continue;
            const unsigned char *b = rx_iov[i].iov_base;
            size_t len = rx_msgs[i].msg_len;
            int waits = is_deferred(&rx_names[i]);
            if (!waits && IS_CHANNEL_DATA(b, len)) {
                PyObject *client = address_tuple(&rx_names[i]);
                if (client == NULL)
                    goto fail;
                int routed = route_from_client(s_udp, b, len, client, to_peer, local, now,
                                               &forwards[queued]);
                Py_DECREF(client);
                if (routed < 0)
                    goto fail;
                if (routed == 1)
                    queued++;
                if (routed)
                    continue;
                /* No route: the reference path drops it; it is Python's to drop. */
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

PyDoc_STRVAR(forward_channel_data_doc,
"forward_channel_data(sock, limit, to_peer_by_channel, local) -> tuple[int, list]\n\n"
"Read up to limit datagrams from a UDP client listener bound to local, as recv_batch\n"
"does, and relay the ChannelData of bound channels to their peers at once (what\n"
"ForwardingTable.from_client does, counters included). Returns how many datagrams were read and the (data, client) pairs left for\n"
"Python, in their order. Once a client has a datagram left for Python, its later ones\n"
"in the batch are left too, and no more is read before Python has seen them, so that\n"
"each client's datagrams take effect in the order they came.");

static PyObject *
forward_channel_data(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[2]) || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "forward_channel_data(sock, limit, to_peer_by_channel: dict, local)");
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

/* STUN: a Send indication's type, and the attributes its common shape has. */
#define SEND_INDICATION 0x0016
#define ATTR_XOR_PEER_ADDRESS 0x0012
#define ATTR_DATA 0x0013
#define ATTR_DONT_FRAGMENT 0x001A

/* Route one Send indication (b, len: a whole STUN message) from `client` of `local` over
 * `transport`, of the common shape TurnServer._route_send_indication takes without a
 * decode (pyturn/core/relaying.py): an IPv4 XOR-PEER-ADDRESS, DATA, DONT-FRAGMENT and
 * nothing else. 1 when its payload is described in *f and counted, 0 when it is Python's
 * (another shape, or no permission: the reference path decides, and drops), -1 on an
 * error. Bandwidth limits are the caller's to rule out. */
static int
route_send_indication(PyObject *transport, const unsigned char *b, size_t len,
                      PyObject *client, PyObject *to_peer_by_ip, PyObject *local,
                      struct forward *f)
{
    if (len < 20 || (((unsigned int)b[0] << 8) | b[1]) != SEND_INDICATION ||
        memcmp(b + 4, "\x21\x12\xa4\x42", 4) != 0 ||
        20 + (((size_t)b[2] << 8) | b[3]) != len)
        return 0;
    const unsigned char *peer = NULL, *payload = NULL;
    size_t payload_len = 0, pos = 20;
    while (pos < len) {
        if (pos + 4 > len)
            return 0;
        unsigned int type = ((unsigned int)b[pos] << 8) | b[pos + 1];
        size_t size = ((size_t)b[pos + 2] << 8) | b[pos + 3], end = pos + 4 + size;
        if (end > len)
            return 0;
        if (type == ATTR_XOR_PEER_ADDRESS) {
            if (peer == NULL) {
                if (size != 8 || b[pos + 4] != 0 || b[pos + 5] != 1)
                    return 0;
                peer = b + pos + 4;
            }
        } else if (type == ATTR_DATA) {
            if (payload == NULL) {
                payload = b + pos + 4;
                payload_len = size;
            }
        } else if (type != ATTR_DONT_FRAGMENT) {
            return 0;
        }
        pos = end + ((4 - size % 4) % 4);
    }
    if (peer == NULL || payload == NULL)
        return 0;
    unsigned int port = (((unsigned int)peer[2] << 8) | peer[3]) ^ 0x2112;
    unsigned char ip[4] = {peer[4] ^ 0x21, peer[5] ^ 0x12, peer[6] ^ 0xa4, peer[7] ^ 0x42};
    PyObject *host = PyUnicode_FromFormat("%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]);
    if (host == NULL)
        return -1;
    PyObject *key = PyTuple_Pack(4, transport, client, local, host);
    Py_DECREF(host);
    if (key == NULL)
        return -1;
    PyObject *route = PyDict_GetItemWithError(to_peer_by_ip, key); /* borrowed */
    Py_DECREF(key);
    if (route == NULL)
        return PyErr_Occurred() ? -1 : 0;
    /* (relay, relay_key, counters) */
    PyObject *relay_key = item(route, 3, 1);
    if (relay_key == NULL)
        return -1;
    f->fd = (int)PyLong_AsLong(relay_key);
    if (f->fd == -1 && PyErr_Occurred())
        return -1;
    struct sockaddr_in *sin = (struct sockaddr_in *)&f->name;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    memcpy(&sin->sin_addr, ip, 4);
    f->namelen = sizeof *sin;
    if (pass_limits(PyTuple_GET_ITEM(route, 2), TO_PEER, payload_len, 0, 1) < 0)
        return -1;
    f->payload.iov_base = (void *)payload;
    f->payload.iov_len = payload_len;
    f->sent = 0;
    return 1;
}

PyDoc_STRVAR(relay_stream_doc,
"relay_stream(data, five_tuple, to_peer_by_channel, to_peer_by_ip) -> int\n\n"
"Relay the whole frames at the start of data (bytes or bytearray, what the TCP or TLS\n"
"client connection five_tuple has read) that go to a peer: ChannelData on a bound\n"
"channel, as ForwardingTable.from_client does, and Send indications of the common shape\n"
"to a permitted peer, as TurnServer._route_send_indication does, counters included.\n"
"Returns how many bytes they took, padding included. It stops at the first frame that\n"
"is not whole or not routed: the rest is Python's, in order. Under bandwidth limits it\n"
"takes nothing, since a stream over its limit waits (ForwardingTable.stream_wait)\n"
"rather than drops.");

static PyObject *
relay_stream(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != 3 ||
        !PyDict_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "relay_stream(data, five_tuple: tuple, "
                                         "to_peer_by_channel: dict, to_peer_by_ip: dict)");
        return NULL;
    }
    if (bandwidth_limited())
        return PyLong_FromLong(0);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *transport = PyTuple_GET_ITEM(args[1], 0);
    PyObject *client = PyTuple_GET_ITEM(args[1], 1);
    PyObject *local = PyTuple_GET_ITEM(args[1], 2);
    const unsigned char *b = view.buf;
    size_t len = (size_t)view.len, pos = 0;
    int queued = 0, failed = 0;
    while (len - pos >= 4) {
        size_t length = ((size_t)b[pos + 2] << 8) | b[pos + 3];
        int routed;
        size_t size;
        if (IS_CHANNEL_DATA(b + pos, 1)) {
            size = 4 + ((length + 3) & ~(size_t)3); /* RFC 8656 §12.5: padded on streams */
            if (size > len - pos)
                break;
            routed = route_from_client(transport, b + pos, 4 + length, client, args[2], local,
                                       0, &forwards[queued]);
        } else {
            size = 20 + length;
            if (size > len - pos || length % 4)
                break; /* not whole, or a length no stream allows: the framer's to refuse */
            routed = route_send_indication(transport, b + pos, size, client, args[3], local,
                                           &forwards[queued]);
        }
        if (routed < 0)
            failed = 1;
        if (routed <= 0)
            break;
        queued++;
        pos += size;
        if (queued == BATCH) {
            flush_forwards(queued);
            queued = 0;
        }
    }
    flush_forwards(queued);
    PyBuffer_Release(&view);
    return failed ? NULL : PyLong_FromSize_t(pos);
}

PyDoc_STRVAR(listener_ready_doc,
"listener_ready(sock, limit, to_peer_by_channel, local, handle, failed) -> None\n\n"
"The event loop's callback for a UDP client listener, so that a wake-up the native path\n"
"serves runs no Python: forward_channel_data(sock, limit, to_peer_by_channel, local),\n"
"then handle(received, left) when datagrams were left for Python or the limit was\n"
"reached, or failed(exc) when reading raised an OSError.");

static PyObject *
listener_ready(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_Check(args[2]) || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "listener_ready(sock, limit, to_peer_by_channel, local, handle, failed)");
        return NULL;
    }
    int fd;
    Py_ssize_t limit;
    if (socket_and_limit(args, &fd, &limit) < 0)
        return NULL;
    Py_ssize_t received = 0;
    PyObject *left = NULL;
    if (forward(fd, limit, args[2], args[3], &received, &left) < 0) {
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

/* ---------------------------------------------------------------------------------------
 * Peer -> client: ForwardingTable.from_peer.
 */

static PyObject *route_from_peer(PyObject *to_client, PyObject *relay_key, PyObject *peer);

/* dict[(a, b)], borrowed; NULL without an exception when it is not there. */
static PyObject *
get_by_pair(PyObject *dict, PyObject *a, PyObject *b)
{
    PyObject *key = PyTuple_Pack(2, a, b);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(dict, key);
    Py_DECREF(key);
    return value;
}

/* The flow a Data indication from `peer` goes to (the table's to_client_by_ip), borrowed;
 * NULL without an exception when there is none (no permission: nothing is relayed). */
static PyObject *
indication_flow(PyObject *to_client_by_ip, PyObject *relay_key, PyObject *peer)
{
    PyObject *flow = get_by_pair(to_client_by_ip, relay_key, PyTuple_GET_ITEM(peer, 0));
    if (flow == NULL)
        return NULL;
    if (item(flow, FLOW_SIZE, 0) == NULL)
        return NULL;
    return flow;
}

/* Where a datagram from `peer` goes: its flow (borrowed) and, through *header, the
 * channel's 2-byte prefix, or NULL for a Data indication; NULL without an exception when
 * it goes nowhere. */
static PyObject *
flow_from_peer(PyObject *to_client, PyObject *to_client_by_ip, PyObject *relay_key,
               PyObject *peer, PyObject **header)
{
    *header = NULL;
    PyObject *entry = route_from_peer(to_client, relay_key, peer);
    if (entry != NULL) {
        *header = PyTuple_GET_ITEM(entry, TO_CLIENT_HEADER);
        return PyTuple_GET_ITEM(entry, TO_CLIENT_FLOW);
    }
    if (PyErr_Occurred())
        return NULL;
    return indication_flow(to_client_by_ip, relay_key, peer);
}

/* The Data indication for `len` bytes at b from `peer`, made by the table's function
 * `indication(peer, data)`: a new reference to bytes, or NULL with an exception. */
static PyObject *
make_indication(PyObject *indication, PyObject *peer, const unsigned char *b, size_t len)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)b, (Py_ssize_t)len);
    if (data == NULL)
        return NULL;
    PyObject *frame = PyObject_CallFunctionObjArgs(indication, peer, data, NULL);
    Py_DECREF(data);
    if (frame != NULL && !PyBytes_Check(frame)) {
        Py_DECREF(frame);
        PyErr_SetString(PyExc_TypeError, "a Data indication is bytes");
        return NULL;
    }
    return frame;
}

/* The (header, flow) entry for a datagram from `peer` on relay `relay_key`, borrowed;
 * NULL without an exception when there is none (no channel: a Data indication, or
 * nothing, see flow_from_peer). */
static PyObject *
route_from_peer(PyObject *to_client, PyObject *relay_key, PyObject *peer)
{
    PyObject *entry = get_by_pair(to_client, relay_key, peer);
    if (entry == NULL)
        return NULL;
    PyObject *header = item(entry, TO_CLIENT_SIZE, TO_CLIENT_HEADER);
    if (header == NULL)
        return NULL;
    if (!PyBytes_Check(header) || PyBytes_GET_SIZE(header) != 2 ||
        item(PyTuple_GET_ITEM(entry, TO_CLIENT_FLOW), FLOW_SIZE, 0) == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "not a forwarding table entry");
        return NULL;
    }
    return entry;
}

/* A run of frames for one client, sent when the flow changes or the batch ends: to a UDP
 * client with send_runs, to a TCP or TLS client as one write(bytes) of the connection's
 * transport (padded frames, RFC 8656 §12.5), so that TLS makes one record of them. */
struct client_run {
    PyObject *flow;  /* a reference of the run's own; NULL when no run is open */
    PyObject *write; /* a stream client's: a reference of the run's own; NULL for UDP */
    int fd;
    struct sockaddr_storage name;
    socklen_t namelen;
    struct iovec frames[BATCH];
    Py_ssize_t count, payload_bytes;
};

/* One write of the run's frames, padded, to a stream client. A write that fails is a
 * connection on its way out: what it carried is dropped, as on a full UDP socket. */
static void
write_stream_run(struct client_run *run)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < run->count; i++)
        total += (Py_ssize_t)((run->frames[i].iov_len + 3) & ~(size_t)3);
    PyObject *data = PyBytes_FromStringAndSize(NULL, total);
    if (data == NULL) {
        PyErr_Clear();
        return;
    }
    char *out = PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < run->count; i++) {
        size_t size = run->frames[i].iov_len, padded = (size + 3) & ~(size_t)3;
        memcpy(out, run->frames[i].iov_base, size);
        memset(out + size, 0, padded - size);
        out += padded;
    }
    PyObject *done = PyObject_CallOneArg(run->write, data);
    Py_DECREF(data);
    if (done == NULL)
        PyErr_Clear();
    Py_XDECREF(done);
}

static int
flush_run(struct client_run *run)
{
    if (run->flow == NULL || run->count == 0)
        return 0;
    if (run->write != NULL) {
        write_stream_run(run);
    } else {
        int full;
        send_runs(run->fd, &run->name, run->namelen, run->frames, run->count, &full);
    }
    int rc = add_counts(PyTuple_GET_ITEM(run->flow, FLOW_COUNTERS), PACKETS_TO_CLIENT,
                        run->count, run->payload_bytes);
    run->count = run->payload_bytes = 0;
    return rc;
}

/* A stream client's write function, from `streams` (five-tuple -> write): 1 when found
 * (a new reference in *write), 0 when the client is not there (gone, or its transport's
 * buffer is full: Python's path then decides), -1 on an error. */
static int
stream_write(PyObject *flow, PyObject *streams, PyObject **write)
{
    PyObject *key = PyTuple_Pack(3, PyTuple_GET_ITEM(flow, FLOW_TRANSPORT),
                                 PyTuple_GET_ITEM(flow, FLOW_CLIENT),
                                 PyTuple_GET_ITEM(flow, FLOW_SERVER));
    if (key == NULL)
        return -1;
    *write = PyDict_GetItemWithError(streams, key);
    Py_DECREF(key);
    if (*write == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(*write);
    return 1;
}

/* Open a run for `flow`: 1, or 0 when the flow is not served here (a listener not in
 * `listeners`, a stream client not in `streams`), -1 on an error. */
static int
open_run(struct client_run *run, PyObject *flow, PyObject *listeners, PyObject *streams)
{
    if (run->flow == flow)
        return 1;
    if (flush_run(run) < 0)
        return -1;
    Py_CLEAR(run->flow);
    Py_CLEAR(run->write);
    PyObject *transport = PyTuple_GET_ITEM(flow, FLOW_TRANSPORT);
    int udp = transport == s_udp ? 1 : PyObject_RichCompareBool(transport, s_udp, Py_EQ);
    if (udp < 0)
        return -1;
    if (!udp) {
        int found = stream_write(flow, streams, &run->write);
        if (found > 0) {
            Py_INCREF(flow);
            run->flow = flow;
        }
        return found;
    }
    PyObject *fd = PyDict_GetItemWithError(listeners, PyTuple_GET_ITEM(flow, FLOW_SERVER));
    if (fd == NULL)
        return PyErr_Occurred() ? -1 : 0;
    run->fd = (int)PyLong_AsLong(fd);
    if (run->fd == -1 && PyErr_Occurred())
        return -1;
    if (parse_address(PyTuple_GET_ITEM(flow, FLOW_CLIENT), &run->name, &run->namelen) < 0)
        return -1;
    Py_INCREF(flow);
    run->flow = flow;
    return 1;
}

/* Serve up to `reads` datagrams queued on relay socket fd (whose table key is relay_key):
 * ChannelData and Data indications to UDP clients and to the stream clients in `streams`
 * go out here; the rest is appended to *left as (data, peer) for Python (the list is
 * made on first use). 0, or -1 with an exception. */
static int
serve_endpoint(int fd, PyObject *relay_key, Py_ssize_t reads, PyObject *to_client,
               PyObject *to_client_by_ip, PyObject *indication, PyObject *listeners,
               PyObject *streams, PyObject **left)
{
    if (ensure_rx_buffers() < 0)
        return -1;
    struct client_run run = {.flow = NULL, .write = NULL, .count = 0, .payload_bytes = 0};
    /* The Data indications made in this call: alive until they have been sent. */
    PyObject *made = NULL;
    Py_ssize_t done_reads = 0;
    int stale_errors = 0;
    while (done_reads < reads) {
        unsigned int vlen = reads - done_reads > BATCH ? BATCH : (unsigned int)(reads - done_reads);
        int n = receive(fd, vlen, 4, &stale_errors); /* room for the ChannelData header */
        if (n < 0)
            break; /* empty, or an error the next wake-up meets again */
        done_reads += n;
        u64 now = monotonic_ns();
        for (int i = 0; i < n; i++) {
            if (rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
                continue;
            unsigned char *b = rx_iov[i].iov_base;
            size_t len = rx_msgs[i].msg_len;
            PyObject *peer = address_tuple(&rx_names[i]);
            if (peer == NULL)
                goto error;
            PyObject *header;
            PyObject *flow = flow_from_peer(to_client, to_client_by_ip, relay_key, peer, &header);
            int served = 0;
            if (flow != NULL)
                served = open_run(&run, flow, listeners, streams);
            if (served < 0 || (flow == NULL && PyErr_Occurred())) {
                Py_DECREF(peer);
                goto error;
            }
            if (flow == NULL) {
                Py_DECREF(peer);
                continue; /* RFC 8656 §11.3: no permission, no relaying */
            }
            if (!served) {
                Py_DECREF(peer);
                if (*left == NULL && (*left = PyList_New(0)) == NULL)
                    goto error;
                if (append_datagram(*left, i) < 0)
                    goto error;
                continue;
            }
            /* Counted by the run (flush_run); here only what the limits let through. */
            int passed = bandwidth_limited()
                             ? pass_limits(PyTuple_GET_ITEM(flow, FLOW_COUNTERS), TO_CLIENT, len,
                                           now, 0)
                             : 1;
            if (passed <= 0) {
                Py_DECREF(peer);
                if (passed < 0)
                    goto error;
                continue;
            }
            if (header != NULL) {
                Py_DECREF(peer);
                const char *h = PyBytes_AS_STRING(header);
                b[-4] = (unsigned char)h[0];
                b[-3] = (unsigned char)h[1];
                b[-2] = (unsigned char)(len >> 8);
                b[-1] = (unsigned char)len;
                run.frames[run.count].iov_base = b - 4;
                run.frames[run.count].iov_len = len + 4;
            } else {
                PyObject *frame = make_indication(indication, peer, b, len);
                Py_DECREF(peer);
                if (frame == NULL)
                    goto error;
                if (made == NULL && (made = PyList_New(0)) == NULL) {
                    Py_DECREF(frame);
                    goto error;
                }
                int appended = PyList_Append(made, frame);
                Py_DECREF(frame); /* the list keeps it */
                if (appended < 0)
                    goto error;
                run.frames[run.count].iov_base = PyBytes_AS_STRING(frame);
                run.frames[run.count].iov_len = (size_t)PyBytes_GET_SIZE(frame);
            }
            run.count++;
            run.payload_bytes += (Py_ssize_t)len;
        }
        if (flush_run(&run) < 0)
            goto error;
        if ((unsigned int)n < vlen)
            break;
    }
    Py_CLEAR(run.flow);
    Py_CLEAR(run.write);
    Py_XDECREF(made);
    return 0;
error:
    flush_run(&run);
    Py_CLEAR(run.flow);
    Py_CLEAR(run.write);
    Py_XDECREF(made);
    return -1;
}

#define MAX_EVENTS 256

PyDoc_STRVAR(serve_relays_doc,
"serve_relays(epoll, endpoints, limit, reads, to_client_by_peer, to_client_by_ip,\n"
"             indication, udp_listeners, stream_writes)\n"
"    -> list[tuple[endpoint, list[tuple[bytes, tuple[str, int]]]]]\n\n"
"One epoll_wait (no waiting) on the relay sockets' epoll instance for up to limit\n"
"ready sockets. endpoints maps each registered fd (the socket's table key) to an\n"
"object of the caller's. Up to reads datagrams of each ready socket are read; what\n"
"goes to UDP clients (udp_listeners maps a listener's local address to its fd) and to\n"
"TCP and TLS clients (stream_writes maps a client's 5-tuple to its transport's write)\n"
"goes out here, as ForwardingTable.from_peer would make it, counters included:\n"
"ChannelData, and Data indications made by indication(peer, data); a stream client\n"
"gets one write per wake-up and client. Returns (endpoint, datagrams) for each socket\n"
"with datagrams left for Python.");

static PyObject *
serve_relays(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9 || !PyDict_Check(args[1]) || !PyDict_Check(args[4]) ||
        !PyDict_Check(args[5]) || !PyCallable_Check(args[6]) || !PyDict_Check(args[7]) ||
        !PyDict_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError,
                        "serve_relays(epoll, endpoints: dict, limit, reads, "
                        "to_client_by_peer: dict, to_client_by_ip: dict, indication, "
                        "udp_listeners: dict, stream_writes: dict)");
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
        if (endpoint == NULL) {
            Py_DECREF(key);
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        Py_INCREF(endpoint);
        PyObject *left = NULL;
        int rc = serve_endpoint(events[i].data.fd, key, reads, args[4], args[5], args[6],
                                args[7], args[8], &left);
        Py_DECREF(key);
        if (rc == 0 && left != NULL) {
            PyObject *pair = PyTuple_Pack(2, endpoint, left);
            rc = pair == NULL ? -1 : PyList_Append(out, pair);
            Py_XDECREF(pair);
        }
        Py_XDECREF(left);
        Py_DECREF(endpoint);
        if (rc < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(serve_relay_doc,
"serve_relay(sock, reads, to_client_by_peer, to_client_by_ip, indication,\n"
"            udp_listeners, stream_writes, deliver) -> None\n\n"
"The event loop's callback for a relay socket it watches itself (its descriptor is its\n"
"table key): served as by serve_relays, then deliver(datagrams) with what was left for\n"
"Python, if anything was.");

static PyObject *
serve_relay(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyDict_Check(args[2]) || !PyDict_Check(args[3]) ||
        !PyCallable_Check(args[4]) || !PyDict_Check(args[5]) || !PyDict_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "serve_relay(sock, reads, to_client_by_peer: dict, "
                        "to_client_by_ip: dict, indication, udp_listeners: dict, "
                        "stream_writes: dict, deliver)");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    Py_ssize_t reads = PyLong_AsSsize_t(args[1]);
    if (reads < 0 && PyErr_Occurred())
        return NULL;
    PyObject *key = PyLong_FromLong(fd);
    if (key == NULL)
        return NULL;
    PyObject *left = NULL;
    int rc = serve_endpoint(fd, key, reads, args[2], args[3], args[4], args[5], args[6], &left);
    Py_DECREF(key);
    if (rc < 0) {
        Py_XDECREF(left);
        return NULL;
    }
    if (left == NULL)
        Py_RETURN_NONE;
    PyObject *done = PyObject_CallOneArg(args[7], left);
    Py_DECREF(left);
    return done;
}

/* ---------------------------------------------------------------------------------------
 * The two routing rules on their own, without sockets: what the differential test
 * compares with the reference path.
 */

PyDoc_STRVAR(route_client_datagram_doc,
"route_client_datagram(to_peer_by_channel, local, client, data, now)\n"
"    -> tuple[int, tuple[str, int], bytes] | None\n\n"
"What forward_channel_data does with ChannelData data from UDP client `client` at\n"
"`now` (ns): (relay key, peer, payload), counted, or None when it has no route (left\n"
"for Python) or is over a bandwidth limit (dropped, counted).");

static PyObject *
route_client_datagram(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "route_client_datagram(to_peer_by_channel: dict, local, client, "
                        "data: bytes, now: int)");
        return NULL;
    }
    u64 now = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(args[3]);
    size_t len = (size_t)PyBytes_GET_SIZE(args[3]);
    if (!IS_CHANNEL_DATA(b, len))
        Py_RETURN_NONE;
    struct forward f;
    int routed = route_from_client(s_udp, b, len, args[2], args[0], args[1], now, &f);
    if (routed < 0)
        return NULL;
    if (routed != 1)
        Py_RETURN_NONE;
    struct sockaddr_storage *name = &f.name;
    char host[INET6_ADDRSTRLEN];
    int port;
    if (name->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const void *)name;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
        port = ntohs(sin->sin_port);
    } else {
        const struct sockaddr_in6 *sin6 = (const void *)name;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
        port = ntohs(sin6->sin6_port);
    }
    return Py_BuildValue("(i(si)y#)", f.fd, host, port, (const char *)f.payload.iov_base,
                         (Py_ssize_t)f.payload.iov_len);
}

PyDoc_STRVAR(route_peer_datagram_doc,
"route_peer_datagram(to_client_by_peer, to_client_by_ip, indication, relay_key, peer,\n"
"                    data, now) -> tuple[flow, bytes] | None\n\n"
"What serve_relay does with a datagram from `peer` for a UDP client at `now` (ns):\n"
"(flow, frame), counted, where the frame is ChannelData or the Data indication\n"
"indication(peer, data) made; None when nothing is relayed (no permission, or over a\n"
"bandwidth limit: dropped, counted).");

static PyObject *
route_peer_datagram(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyDict_Check(args[0]) || !PyDict_Check(args[1]) ||
        !PyCallable_Check(args[2]) || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "route_peer_datagram(to_client_by_peer: dict, to_client_by_ip: dict, "
                        "indication, relay_key, peer, data: bytes, now: int)");
        return NULL;
    }
    u64 now = PyLong_AsUnsignedLongLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t len = PyBytes_GET_SIZE(args[5]);
    if (len > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "larger than a UDP datagram");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    PyObject *header;
    PyObject *flow = flow_from_peer(args[0], args[1], args[3], args[4], &header);
    if (flow == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    int passed = pass_limits(PyTuple_GET_ITEM(flow, FLOW_COUNTERS), TO_CLIENT, (size_t)len, now, 1);
    if (passed <= 0) {
        if (passed < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *frame;
    if (header != NULL) {
        frame = PyBytes_FromStringAndSize(NULL, len + 4);
        if (frame == NULL)
            return NULL;
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(frame);
        memcpy(out, PyBytes_AS_STRING(header), 2);
        out[2] = (unsigned char)(len >> 8);
        out[3] = (unsigned char)len;
        memcpy(out + 4, data, (size_t)len);
    } else {
        frame = make_indication(args[2], args[4], data, (size_t)len);
        if (frame == NULL)
            return NULL;
    }
    return Py_BuildValue("(ON)", flow, frame);
}

static PyMethodDef fastpath_methods[] = {
    {"forward_channel_data", (PyCFunction)(void (*)(void))forward_channel_data, METH_FASTCALL,
     forward_channel_data_doc},
    {"listener_ready", (PyCFunction)(void (*)(void))listener_ready, METH_FASTCALL,
     listener_ready_doc},
    {"serve_relays", (PyCFunction)(void (*)(void))serve_relays, METH_FASTCALL,
     serve_relays_doc},
    {"serve_relay", (PyCFunction)(void (*)(void))serve_relay, METH_FASTCALL, serve_relay_doc},
    {"relay_stream", (PyCFunction)(void (*)(void))relay_stream, METH_FASTCALL, relay_stream_doc},
    {"set_bandwidth", (PyCFunction)(void (*)(void))set_bandwidth, METH_FASTCALL,
     set_bandwidth_doc},
    {"admit", (PyCFunction)(void (*)(void))admit, METH_FASTCALL, admit_doc},
    {"route_client_datagram", (PyCFunction)(void (*)(void))route_client_datagram,
     METH_FASTCALL, route_client_datagram_doc},
    {"route_peer_datagram", (PyCFunction)(void (*)(void))route_peer_datagram, METH_FASTCALL,
     route_peer_datagram_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef batch_module = {
    PyModuleDef_HEAD_INIT,
    "pyturn.net._batch",
    "Batched UDP I/O and the table-driven relay fast path (see pyturn/net/batch.py).",
    -1,
    fastpath_methods,
};

PyMODINIT_FUNC
PyInit__batch(void)
{
    if (udp_batch_init() < 0)
        return NULL;
    s_udp = PyUnicode_InternFromString("udp");
    if (s_udp == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&batch_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddFunctions(module, udp_batch_methods) < 0 ||
        PyModule_AddIntConstant(module, "BATCH", BATCH) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

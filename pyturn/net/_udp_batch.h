/*
 * What _udp_batch.c (batched UDP I/O, no TURN knowledge) offers _fastpath.c (the
 * table-driven relay); both are compiled into the one module pyturn.net._batch.
 */
#ifndef PYTURN_UDP_BATCH_H
#define PYTURN_UDP_BATCH_H

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

/* One read takes at most this many datagrams; each slot holds the largest UDP payload. */
#define BATCH 32
#define SLOT 65536

/* The receive slots of the last receive(): BATCH * SLOT bytes, made by ensure_rx_buffers. */
extern unsigned char *rx_buffers;
extern struct mmsghdr rx_msgs[BATCH];
extern struct iovec rx_iov[BATCH];
extern struct sockaddr_storage rx_names[BATCH];

int ensure_rx_buffers(void);
/* One recvmmsg of up to vlen datagrams into the slots, each `headroom` bytes in. */
int receive(int fd, unsigned int vlen, size_t headroom, int *stale_errors);
int nothing_to_read(int err);
/* (host, port) of a socket address; IPv4 tuples are cached. New reference or NULL. */
PyObject *address_tuple(const struct sockaddr_storage *name);
int parse_address(PyObject *addr, struct sockaddr_storage *name, socklen_t *namelen);
int same_address(const struct sockaddr_storage *a, const struct sockaddr_storage *b);
/* Append (data, (host, port)) of receive slot i to the list out. */
int append_datagram(PyObject *out, int i);
int socket_and_limit(PyObject *const *args, int *fd, Py_ssize_t *limit);
/* Send frames to one address, GSO for equal-sized runs; how many went out. */
Py_ssize_t send_runs(int fd, const struct sockaddr_storage *name, socklen_t namelen,
                     const struct iovec *frames, Py_ssize_t total, int *full);

extern PyMethodDef udp_batch_methods[];
int udp_batch_init(void);

#endif

"""The operators' control socket (`control.socket`): a UNIX stream socket, never TCP.

coturn's answer to "who is connected, and end that session" was a telnet CLI on a TCP
port, which became CVE-2018-4059. Here whoever may open the socket file (mode 0660: the
service user and its group) may control the server, and nobody else can reach it.

A client writes one JSON object per line and reads one JSON object per line back: `{"ok":
true, ...}` or `{"ok": false, "error": "..."}`. What the requests mean is
pyturn/net/node_control.py's business; this file keeps the socket safe to serve: a
request is at most REQUEST_LIMIT bytes, a client gets IDLE_TIMEOUT seconds to send one
and WRITE_TIMEOUT seconds to read its answer, at most MAX_CLIENTS are served at once,
and nothing a client sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from pyturn.net.errors import StartupError

log = logging.getLogger(__name__)

Message = dict[str, Any]

REQUEST_LIMIT = 64 * 1024
IDLE_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CLIENTS = 16
SOCKET_MODE = 0o660


class NoSocketDirectory(Exception):
    """The socket's directory does not exist (a machine without systemd's
    RuntimeDirectory): the server runs without a control socket."""


def bind_control_socket(path: str) -> socket.socket:
    """A listening socket at `path` with mode 0660, replacing a socket file that a
    crashed server left behind; never an existing file that is not a socket, nor the
    socket of a server that still answers on it."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise NoSocketDirectory(directory)
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(found.st_mode):
            raise StartupError(
                f"control.socket {path} exists and is not a socket: not replacing it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: left by a server that did not stop cleanly.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise StartupError(f"control.socket {path}: {exc.strerror or exc}") from exc
        else:
            raise StartupError(
                f"control.socket {path}: another server is running on it (stop it, or give "
                "this one another control.socket)"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The mode is right from the first instant: no window in which others could connect.
    umask = os.umask(0o777 & ~SOCKET_MODE)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"control.socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(umask)
    os.chmod(path, SOCKET_MODE)  # whatever the umask allowed, exactly 0660
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


def encode_line(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error(text: str) -> Message:
    return {"ok": False, "error": text}


class ControlSocket:
    def __init__(self, path: str, handle: Callable[[Message], Awaitable[Message]]) -> None:
        """`handle` answers one well-formed request (a JSON object with a string "op")."""
        self.path = path
        self.handle = handle
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = bind_control_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=REQUEST_LIMIT)
        log.info("control socket on %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            await self._send(writer, error(f"busy: {MAX_CLIENTS} control clients already"))
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, error(f"request longer than {REQUEST_LIMIT} bytes"))
                    break
                except ConnectionError:
                    break
                if not line.strip():
                    if not line:
                        break  # end of file
                    continue
                if not await self._send(writer, await self._answer(line)):
                    break
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, line: bytes) -> Message:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return error("not a JSON object")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return error('a request is a JSON object with an "op"')
        try:
            return await self.handle(request)
        except (ValueError, TypeError) as exc:
            return error(str(exc))
        except Exception:  # a bug must not stop the socket, nor the server
            log.exception("control request %r failed", request.get("op"))
            return error("internal error (see the server's log)")

    async def _send(self, writer: asyncio.StreamWriter, message: Message) -> bool:
        """False when the client has gone or does not read its answer in time."""
        if writer.is_closing():
            return False
        writer.write(encode_line(message))
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
            return False
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        # Remove the file only if it is still ours (not a successor's).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

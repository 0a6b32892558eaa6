"""Logging set-up: one line per event, as text or as JSON objects.

Session events (allocation created, refreshed, deleted; auth failures; denied peers) go
through `log_event`, which writes `what happened key=value ...` in text and, in JSON, the
same keys as fields of the object, so log pipelines need no regular expressions and
fail2ban can match `client=<HOST>` in either format. Nothing is logged per packet above
DEBUG. Events a client can provoke at will (auth failures, denied peers) pass through a
`LogThrottle`, which lets a few lines per client through per window and sums up the rest
in one "suppressed" line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, TextIO

if TYPE_CHECKING:
    from pyturn.config import LoggingConfig

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

FieldValue = str | int | float | bool | None


def format_address(address: tuple[str, int]) -> str:
    """`192.0.2.1:3478`, or `[2001:db8::1]:3478` for IPv6."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What would blur the key=value layout: whitespace (as str.isspace sees it), quotes, "=".
_NEEDS_QUOTES = re.compile(r"[\s\"'=]")
# Values seen to need no quoting: transports, usernames, reasons come back line after line.
_PLAIN: set[str] = set()
_PLAIN_SIZE = 1024


def forget_plain_values() -> None:
    """Empty the memo of quote-free values (client addresses of gone sessions)."""
    _PLAIN.clear()


def _text_value(value: FieldValue) -> str:
    kind = type(value)
    if kind is int or kind is bool:
        return str(value)  # digits, a sign, True/False: never quoted
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    text = value if kind is str else "-" if value is None else str(value)
    assert isinstance(text, str)
    if text in _PLAIN:
        return text
    # Usernames come from clients: quote anything that would blur the key=value layout.
    if not text or _NEEDS_QUOTES.search(text) is not None or not text.isprintable():
        return json.dumps(text)
    if len(_PLAIN) >= _PLAIN_SIZE:
        _PLAIN.clear()
    _PLAIN.add(text)
    return text


def log_event(
    logger: logging.Logger, level: int, event: str, fields: Mapping[str, FieldValue]
) -> None:
    """Log `event` (a snake_case name) with `fields`: `event words key=value ...` in text.

    JSON output carries `event` and each field as its own key (see `JsonFormatter`).
    """
    if not logger.isEnabledFor(level):
        return
    text = " ".join(
        [
            f"{key}={value}" if type(value) is int else f"{key}={_text_value(value)}"
            for key, value in fields.items()
        ]
    )
    handler = _only_handler(logger, level)
    if handler is not None:
        # Nobody else sees this record: write the line the formatter would write,
        # without a LogRecord (about half the cost of a session line).
        handler.add_line(handler.formatter_line(logger.name, level, event, text, fields))
        return
    # The record is made here rather than by `logger.log`, whose search of the stack for
    # the caller costs more than the rest of the line; it would find this very function.
    # (The frame is not kept in a local: a frame referring to itself is a reference
    # cycle that would hold this call's objects, and its callers' frames, until the
    # garbage collector runs.)
    record = logger.makeRecord(
        logger.name,
        level,
        _LOG_EVENT_FILE,
        sys._getframe().f_lineno,
        "%s %s",
        (event.replace("_", " "), text),
        None,
        "log_event",
        {"event": event, "fields": dict(fields)},
    )
    logger.handle(record)


def _only_handler(logger: logging.Logger, level: int) -> LoopBatchingHandler | None:
    """The handler configure_logging installed, if a record from `logger` would reach it
    and nothing else: no filters, no other handlers on the way (pytest's caplog adds one)."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return None
        if node.parent is None:  # the root logger
            handlers = node.handlers
            if len(handlers) != 1:
                return None
            handler = handlers[0]
            if (
                type(handler) is LoopBatchingHandler
                and not handler.filters
                and level >= handler.level
                and type(handler.formatter) in (TextFormatter, JsonFormatter)
            ):
                return handler
            return None
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    return None


_LOG_EVENT_FILE = log_event.__code__.co_filename


class EventLine(NamedTuple):
    """A `log_event` call, for a formatter to write without a LogRecord."""

    created: float
    logger: str
    level: int
    event: str
    text: str
    fields: Mapping[str, FieldValue]


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines.

    Keys: time (UTC, ISO 8601), level, logger, message, then `event` and its fields when
    the line came from `log_event`, and any other `extra` values.
    """

    @staticmethod
    def _head(created: float, level: str, logger: str, message: str) -> dict[str, object]:
        """The keys every line starts with; milliseconds as LogRecord.msecs has them."""
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int((created - int(created)) * 1000):03d}Z",
            "level": level.lower(),
            "logger": logger,
            "message": message,
        }

    def format(self, record: logging.LogRecord) -> str:
        entry = self._head(record.created, record.levelname, record.name, record.getMessage())
        for key, value in record.__dict__.items():
            if key == "fields" and isinstance(value, Mapping):
                for name, item in value.items():
                    entry.setdefault(str(name), item)
            elif key not in _STANDARD_ATTRIBUTES:
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)

    def event_line(self, line: EventLine) -> str:
        """What `format` makes of the record `log_event` would have made."""
        entry = self._head(
            line.created,
            logging.getLevelName(line.level),
            line.logger,
            f"{line.event.replace('_', ' ')} {line.text}",
        )
        entry["event"] = line.event
        for name, item in line.fields.items():
            entry.setdefault(name, item)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s: %(message)s`, as `logging.Formatter` writes it.

    The date and time part changes once a second, so it is formatted once a second.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._stamp(record.created)

    def _stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        # As LogRecord computes msecs.
        return f"{self._second_text},{int((created - second) * 1000):03d}"

    def event_line(self, line: EventLine) -> str:
        """What `format` makes of the record `log_event` would have made."""
        stamp = self._stamp(line.created)
        level = logging.getLevelName(line.level)
        return f"{stamp} {level} {line.logger}: {line.event.replace('_', ' ')} {line.text}"


class LoopBatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes what one event-loop turn logged in one go.

    A line logged on a thread running an asyncio loop waits for the end of that loop
    turn (a `call_soon`), then goes out with the turn's other lines in one write instead
    of a system call each; anywhere else lines are written at once. `flush` (which
    `logging.shutdown` calls at exit) writes whatever is still waiting.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop a flush is queued on: a loop that stopped before running it must not
        # keep later lines waiting.
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line)

    def formatter_line(
        self, logger: str, level: int, event: str, text: str, fields: Mapping[str, FieldValue]
    ) -> str:
        """The line of a `log_event` call, as this handler's formatter would write it."""
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter)
        return formatter.event_line(EventLine(time.time(), logger, level, event, text, fields))

    def add_line(self, line: str) -> None:
        self._pending.append(line + self.terminator)
        loop = asyncio.events._get_running_loop()
        if loop is None:
            self._write_pending()
        elif loop is not self._flush_loop:
            self._flush_loop = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        self._flush_loop = None
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))


SYSLOG_SOCKET = "/dev/log"


def use_logging_config(settings: LoggingConfig) -> None:
    """configure_logging with what the config's `logging` section says."""
    configure_logging(settings.level, settings.format, file=settings.file, syslog=settings.syslog)


def configure_logging(
    level: str = "info", fmt: str = "text", *, file: str | None = None, syslog: bool = False
) -> None:
    """Send logs to stderr (journald under systemd), or to `file`, and to the local
    syslog too with `syslog`. Safe to call again on reload, which reopens `file`: after
    logrotate has moved it, a reload starts a new one. OSError if `file` cannot be
    opened or there is no syslog socket; the handlers in place then stay."""
    stream: TextIO = sys.stderr
    if file is not None:
        stream = open(file, "a", encoding="utf-8")  # noqa: SIM115 (closed on the next call)
    handlers: list[logging.Handler] = [LoopBatchingHandler(stream)]
    handlers[0].setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if syslog:
        try:
            if not os.path.exists(SYSLOG_SOCKET):
                # SysLogHandler would only complain at every line.
                raise FileNotFoundError(f"syslog: no socket at {SYSLOG_SOCKET}")
            system = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
        except OSError:
            if stream is not sys.stderr:
                stream.close()
            raise
        system.setFormatter(logging.Formatter(f"pyturn[{os.getpid()}]: %(name)s: %(message)s"))
        handlers.append(system)
    root = logging.getLogger()
    for existing in list(root.handlers):
        existing.flush()  # lines still waiting for the end of the loop turn
        root.removeHandler(existing)
        if isinstance(existing, LoopBatchingHandler) and existing.stream is not sys.stderr:
            existing.stream.close()
        elif isinstance(existing, logging.handlers.SysLogHandler):
            existing.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))


class LogThrottle:
    """Lets at most `per_key` lines per key and `total` lines in all through per window.

    `allow(key, event, now)` says whether to log one line; what it refuses is counted and
    `flush(now)`, called at least once a second, logs one summary line per window in which
    something was suppressed. Time is an argument, as everywhere in pyturn.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window: float = 10.0,
        per_key: int = 5,
        total: int = 50,
    ) -> None:
        self.logger = logger
        self.window = window
        self.per_key = per_key
        self.total = total
        self._window_start: float | None = None
        self._seen: Counter[str] = Counter()
        self._passed = 0
        self._suppressed: Counter[str] = Counter()
        self._suppressed_keys: set[str] = set()

    def allow(self, key: str, event: str, now: float) -> bool:
        self.flush(now)
        if self._window_start is None:
            self._window_start = now
        self._seen[key] += 1
        if self._seen[key] <= self.per_key and self._passed < self.total:
            self._passed += 1
            return True
        self._suppressed[event] += 1
        self._suppressed_keys.add(key)
        return False

    def flush(self, now: float) -> None:
        """Close the window if it is over, logging what it suppressed."""
        start = self._window_start
        if start is None or now < start + self.window:
            return
        if self._suppressed:
            counts = dict(sorted(self._suppressed.items()))
            log_event(
                self.logger,
                logging.WARNING,
                "log_flood",
                {
                    "suppressed": sum(counts.values()),
                    **counts,
                    "clients": len(self._suppressed_keys),
                    "window": self.window,
                },
            )
        self._window_start = None
        self._seen.clear()
        self._passed = 0
        self._suppressed.clear()
        self._suppressed_keys.clear()

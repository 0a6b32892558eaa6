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

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping

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


def _text_value(value: FieldValue) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    text = "-" if value is None else str(value)
    # Usernames come from clients: quote anything that would blur the key=value layout.
    if not text or any(c.isspace() or c in "\"'=" for c in text) or not text.isprintable():
        return json.dumps(text)
    return text


def log_event(
    logger: logging.Logger, level: int, event: str, fields: Mapping[str, FieldValue]
) -> None:
    """Log `event` (a snake_case name) with `fields`: `event words key=value ...` in text.

    JSON output carries `event` and each field as its own key (see `JsonFormatter`).
    """
    if not logger.isEnabledFor(level):
        return
    text = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
    logger.log(
        level,
        "%s %s",
        event.replace("_", " "),
        text,
        extra={"event": event, "fields": dict(fields)},
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines.

    Keys: time (UTC, ISO 8601), level, logger, message, then `event` and its fields when
    the line came from `log_event`, and any other `extra` values.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key == "fields" and isinstance(value, Mapping):
                for name, item in value.items():
                    entry.setdefault(str(name), item)
            elif key not in _STANDARD_ATTRIBUTES:
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send logs to stderr (journald under systemd); safe to call again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
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

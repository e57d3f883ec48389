"""The monitor server's stderr: one line per event, never a traceback.

    log_line("guard monitor: client 127.0.0.1:5000 aborted the connection: ...")
    quiet_uvicorn_logs()     # uvicorn's and asyncio's loggers: errors only, one line each

uvicorn logs through `uvicorn.error` (start-up banners at INFO, each malformed request at WARNING,
"Exception in ASGI application" with a traceback at ERROR) and asyncio through `asyncio`. The server
keeps ERROR and above of both, each as one `guard monitor: ...` line with the exception's type and
first line instead of its traceback; there is no access log.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from achilles_guard.errors import first_line

__all__ = ["log_line", "quiet_uvicorn_logs"]


def log_line(line: str) -> None:
    """One line on stderr; a closed stderr must not take the server down."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _OneLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not raise here
            message = str(record.msg)
        message = (message.strip() or record.levelname).splitlines()[0]
        err = record.exc_info[1] if record.exc_info else None
        if err is not None:
            message += f": {type(err).__name__}: {first_line(err)}"
        log_line(f"guard monitor: {record.name}: {message}")


def quiet_uvicorn_logs() -> None:
    for name in ("uvicorn.error", "uvicorn.asgi", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers = [_OneLine()]
        logger.setLevel(logging.ERROR)
        logger.propagate = False
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate, access.disabled = [], False, True

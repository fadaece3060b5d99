"""One logging filter that keeps secrets in URLs out of every log line, whichever library wrote it.

httpx logs every request's full URL at INFO ("HTTP Request: GET https://...?X-Amz-Signature=..."), gunicorn
logs invalid request lines, and exceptions quote URLs: presigned query strings and ``user:password@`` would
reach the log in clear.  :class:`RedactingFilter` rewrites each record's formatted message (arguments
included), its traceback and its stack text with the backend's one redaction rule,
:func:`isal_backend.labelstudio.images.safe_source` (query values become REDACTED except Label Studio's
local-files ``d`` path; userinfo and fragments are dropped).  :func:`install_redaction` puts it on every
handler that exists and on the loggers that keep their own handlers (gunicorn's error and access logs, RQ's,
the sdk's), so it holds under ``gunicorn _wsgi:app`` as well as in the worker.  Torch-free.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from isal_backend.labelstudio.images import safe_source

# scheme://... up to whitespace, a quote or a bracket; and a path with a query (/predict?token=...).
_ABSOLUTE = re.compile(r"""\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s"'<>`]+""")
_RELATIVE = re.compile(r"""(?<![\w:/.])/[^\s"'<>`?#]*[?#][^\s"'<>`]*""")
#: Loggers that do not propagate to the root logger, or that have handlers of their own.
OWN_HANDLER_LOGGERS = ("gunicorn.error", "gunicorn.access", "rq.worker", "rq.scheduler", "fern")


def _clean(match: re.Match[str]) -> str:
    url = match.group(0)
    netloc = url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""
    if "?" not in url and "#" not in url and "@" not in netloc:
        return url  # nothing secret: leave it as written
    return safe_source(url, limit=10_000)


def redact_text(text: str) -> str:
    """`text` with every URL's query values, fragment and userinfo removed (see safe_source)."""
    if "?" not in text and "@" not in text and "#" not in text:
        return text
    return _RELATIVE.sub(_clean, _ABSOLUTE.sub(_clean, text))


class RedactingFilter(logging.Filter):
    """Redacts URLs in a record's message (after %-formatting), traceback and stack; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it, with the args, itself
            record.msg, record.args = redact_text(f"{record.msg!s} {record.args!r}"), None
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _add_once(target: logging.Handler | logging.Logger) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(RedactingFilter())


def install_redaction(extra_loggers: Iterable[str] = OWN_HANDLER_LOGGERS) -> None:
    """Put a RedactingFilter on every existing handler (the root's first: every propagated record passes it)
    and on the loggers that log through handlers of their own, whose handlers may be replaced later
    (gunicorn re-creates its handlers on reload, a logger-level filter survives that).  Idempotent."""
    root = logging.getLogger()
    for handler in root.handlers:
        _add_once(handler)
    for name in extra_loggers:
        _add_once(logging.getLogger(name))
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                _add_once(handler)


__all__ = ["OWN_HANDLER_LOGGERS", "RedactingFilter", "install_redaction", "redact_text"]

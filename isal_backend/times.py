"""Timestamps as the backend meets them: Label Studio's (``...Z``, a fraction only when non-zero), its own
reports' (``+00:00``) and Unix times; one parser, so they are compared as times, never as strings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 time or a Unix time as an aware datetime (naive ISO times are UTC); None when unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)

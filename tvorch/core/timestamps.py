"""Timestamps: the one text form tvorch writes times in, and the strict readers of it.

Records, ledgers, manifests, bundles and certifications carry UTC times as
ISO-8601 text with milliseconds and an explicit offset,
``2024-05-01T12:00:00.123+00:00``: sortable as text, exact, and the same on
every node. Readers refuse a time without an offset or at another one, so no
local time is ever taken for UTC.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

EXAMPLE = "2024-05-01T12:00:00.123+00:00"


def utc_now() -> str:
    """Now, in tvorch's form (EXAMPLE)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def format_utc(moment: datetime) -> str:
    """MOMENT (timezone-aware) in tvorch's form (EXAMPLE)."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_utc(text: str) -> datetime | None:
    """The moment TEXT names if it is an ISO-8601 time at UTC (offset +00:00 or Z); None otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.utcoffset() == timedelta(0) else None


def is_canonical_utc(text: str) -> bool:
    """Whether TEXT is exactly tvorch's form of a UTC time (EXAMPLE), as a signed manifest must carry it."""
    moment = parse_utc(text)
    return moment is not None and moment.isoformat(timespec="milliseconds") == text

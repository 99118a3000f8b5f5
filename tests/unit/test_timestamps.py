"""core.timestamps: the one text form of a time, and its strict readers."""

from datetime import datetime, timedelta, timezone

import pytest

from tvorch.core.timestamps import EXAMPLE, format_utc, is_canonical_utc, parse_utc, utc_now


def test_utc_now_is_in_the_canonical_form() -> None:
    now = utc_now()
    assert is_canonical_utc(now) and now.endswith("+00:00") and len(now) == len(EXAMPLE)
    moment = parse_utc(now)
    assert moment is not None and abs(moment - datetime.now(timezone.utc)) < timedelta(seconds=60)


def test_format_utc_converts_to_utc_with_milliseconds() -> None:
    at = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert format_utc(at) == "2024-05-01T12:00:00.123+00:00"
    assert is_canonical_utc(format_utc(at))


@pytest.mark.parametrize("text, parsed, canonical", [
    (EXAMPLE, True, True),
    ("2024-05-01T12:00:00.123Z", True, False),
    ("2024-05-01T12:00:00+00:00", True, False),  # no milliseconds
    ("2024-05-01T12:00:00.123456+00:00", True, False),
    ("2024-05-01T14:00:00.123+02:00", False, False),  # not at UTC
    ("2024-05-01T12:00:00.123", False, False),  # no offset: a local time
    ("yesterday", False, False),
    ("", False, False),
])
def test_readers_refuse_what_is_not_utc(text: str, parsed: bool, canonical: bool) -> None:
    assert (parse_utc(text) is not None) is parsed
    assert is_canonical_utc(text) is canonical

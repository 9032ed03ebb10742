"""Label Studio's per-annotation object built from its webhook's annotation (pure logic; the drop-in
suite compares the result with Label Studio's own target storage, field by field)."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.export.label_studio_object import storage_object, timesince

UTC = dt.UTC
T0 = dt.datetime(2026, 1, 31, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (T0, "0\xa0minutes"),
        (T0 - dt.timedelta(minutes=5), "0\xa0minutes"),  # in the future
        (T0 + dt.timedelta(seconds=59), "0\xa0minutes"),
        (T0 + dt.timedelta(minutes=1), "1\xa0minute"),
        (T0 + dt.timedelta(hours=2, minutes=3), "2\xa0hours, 3\xa0minutes"),
        (T0 + dt.timedelta(days=1, minutes=3), "1\xa0day"),  # adjacent units only
        (T0 + dt.timedelta(days=15), "2\xa0weeks, 1\xa0day"),
        (dt.datetime(2026, 2, 28, 10, 0, tzinfo=UTC), "4\xa0weeks"),  # Jan 31 → Feb 28: not a month
        (dt.datetime(2026, 3, 31, 10, 0, tzinfo=UTC), "2\xa0months"),
        (dt.datetime(2027, 3, 1, 10, 0, tzinfo=UTC), "1\xa0year, 1\xa0month"),
    ],
)
def test_timesince_reads_like_djangos(now: dt.datetime, expected: str) -> None:
    assert timesince(T0, now) == expected


def test_the_object_has_label_studios_fields() -> None:
    webhook = {
        "id": 5,
        "result": [],
        "completed_by": 3,
        "prediction": {},
        "result_count": 0,
        "unique_id": "u",
        "created_at": "2026-01-31T10:00:00.123456Z",
        "task": {"id": 1, "data": {"image": "gs://b/k"}},
    }
    user = {"id": 3, "first_name": "Ann", "last_name": "", "email": "ann@example.com"}
    body = storage_object(webhook, user, T0 + dt.timedelta(minutes=62))
    assert body == {
        "id": 5,
        "result": [],
        "completed_by": user,
        "created_username": "Ann ann@example.com, 3",
        "created_ago": "1\xa0hour, 1\xa0minute",
        "created_at": "2026-01-31T10:00:00.123456Z",
        "task": {"id": 1, "data": {"image": "gs://b/k"}},
    }
    with_last_name = storage_object(webhook, {**user, "last_name": "Lee"}, T0)
    assert with_last_name["created_username"] == "Ann Lee ann@example.com, 3"
    unknown = storage_object(webhook, None, T0)  # no api_token, or a user Label Studio does not know
    assert unknown["completed_by"] == 3 and unknown["created_username"] == ""

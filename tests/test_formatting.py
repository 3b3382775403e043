"""quarkflow_core.formatting: numbers and times as the workbench shows them to people."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from quarkflow_core import formatting as fmt

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 29, 21, 54, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (0.9923, 1, "99.2%"),
        (0.5, 0, "50%"),
        (1.0, 1, "100.0%"),
        (0.0, 1, "0.0%"),
        (0.9999723434448242, 1, ">99.9%"),  # a calibrated 0.99997 is not certainty
        (0.00001, 1, "<0.1%"),
        (0.99997, 2, ">99.99%"),
        (0.97216, 2, "97.22%"),
        (None, 1, "–"),
        (float("nan"), 1, "–"),
    ],
)
def test_percent(value, digits, text):
    assert fmt.percent(value, digits) == text


def test_points_are_signed_percentage_points():
    assert fmt.points(0.012) == "+1.2 pp"
    assert fmt.points(-0.0034, 2) == "-0.34 pp"
    assert fmt.points(None) == "–"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.4213, "0.42 ms"),
        (4.2, "4.2 ms"),
        (63.5897, "63.6 ms"),
        (412.7, "413 ms"),
        (1234.0, "1.2 s"),
        (None, "–"),
    ],
)
def test_ms(value, text):
    assert fmt.ms(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.42, "0.4 s"),
        (42.4, "42 s"),
        (63.5897, "1 min 4 s"),
        (120, "2 min"),
        (3600 * 2 + 5 * 60 + 3, "2 h 5 min"),
        (86400 * 3 + 3600 * 4, "3 d 4 h"),
        (-5, "-5.0 s"),
        (None, "–"),
    ],
)
def test_seconds(value, text):
    assert fmt.seconds(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (512, "512 B"),
        (1536, "1.54 KB"),
        (12_345_678, "12.3 MB"),
        (1_200_000_000, "1.20 GB"),
        (None, "–"),
    ],
)
def test_size(value, text):
    assert fmt.size(value) == text


def test_number_has_thousands_separators():
    assert fmt.number(12345) == "12,345"
    assert fmt.number(1234.56, 1) == "1,234.6"
    assert fmt.number(0) == "0"
    assert fmt.number(None) == "–"


def test_small_labels():
    assert fmt.version(3) == "v3"
    assert fmt.version(None) == "–"
    assert fmt.version(2.0) == "v2"  # an int column with a None in it, through pandas
    assert fmt.words("low_confidence") == "low confidence"
    assert fmt.words(float("nan")) == "–"  # a None that went through pandas
    assert fmt.words(None) == "–"
    assert fmt.short_id("0123456789abcdef") == "01234567"


def test_timestamp_is_readable_utc_without_microseconds():
    assert fmt.timestamp(datetime(2026, 11, 29, 21, 54, 7, 123456, tzinfo=UTC)) == (
        "29 Nov 2026, 21:54 UTC"
    )
    # the database hands back naive UTC; ISO strings (API, events) work too
    assert fmt.timestamp(datetime(2026, 12, 1, 8, 5)) == "1 Dec 2026, 08:05 UTC"
    assert fmt.timestamp("2026-11-29T21:54:07.123456+00:00") == "29 Nov 2026, 21:54 UTC"
    # other zones are converted, not relabelled
    cet = timezone(timedelta(hours=1))
    assert fmt.timestamp(datetime(2026, 11, 29, 22, 54, tzinfo=cet)) == "29 Nov 2026, 21:54 UTC"
    assert fmt.timestamp(None) == "–"


@pytest.mark.parametrize(
    ("ago", "text"),
    [
        (timedelta(seconds=20), "just now"),
        (timedelta(minutes=5, seconds=10), "5 min ago"),
        (timedelta(hours=3, minutes=59), "3 h ago"),
        (timedelta(days=1, hours=2), "1 day ago"),
        (timedelta(days=6), "6 days ago"),
        (timedelta(days=45), "15 Oct 2026, 21:54 UTC"),  # old: the date says more
        (timedelta(minutes=-10), "29 Nov 2026, 22:04 UTC"),  # clock skew: no "in 10 min"
    ],
)
def test_relative(ago, text):
    assert fmt.relative(NOW - ago, now=NOW) == text


def test_when_gives_both():
    assert fmt.when(NOW - timedelta(minutes=5), now=NOW) == "5 min ago (29 Nov 2026, 21:49 UTC)"
    assert fmt.when(NOW - timedelta(days=90), now=NOW) == "31 Aug 2026, 21:54 UTC"
    assert fmt.when(None) == "–"


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("accuracy", 0.97216, "97.22%"),
        ("ece", 0.0123, "1.23%"),
        ("latency_ms", 3.14159, "3.1 ms"),
        ("latency_ms_batch1", 63.5897, "63.6 ms"),
        ("size_bytes", 1_722_345, "1.72 MB"),
        ("params", 431_080, "431,080"),
        ("temperature", 1.2345678, "1.235"),
        ("accuracy", None, "–"),
    ],
)
def test_metric_picks_the_unit_from_the_name(name, value, text):
    assert fmt.metric(name, value) == text


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("accuracy", 0.0123, "+1.23 pp"),
        ("ece", -0.004, "-0.40 pp"),
        ("latency_ms", -0.52, "-0.52 ms"),
        ("size_bytes", 250_000, "+250.0 KB"),
        ("params", -1200, "-1,200"),
    ],
)
def test_metric_delta_is_signed_in_the_same_unit(name, value, text):
    assert fmt.metric_delta(name, value) == text

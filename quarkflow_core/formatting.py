"""Numbers and times as people read them: "99.2%", "63 ms", "1 min 4 s", "12.3 MB", "12,345",
"29 Nov 2026, 21:54 UTC", "5 min ago". Pure functions (no Streamlit, no database) so the
workbench, the CLI and tests format the same value the same way. ``None`` always becomes
``MISSING`` ("–"), so a page never shows "None" or "nan"."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

MISSING = "–"
TIME_FORMAT = "%d %b %Y, %H:%M UTC"
# The same layout for st.column_config.DatetimeColumn (momentJS tokens), shown in UTC.
TABLE_TIME_FORMAT = "D MMM YYYY, HH:mm"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: float | int | None, digits: int = 0) -> str:
    """Thousands separators: 12345 -> "12,345"; 1234.5 with digits=1 -> "1,234.5"."""
    if _missing(value):
        return MISSING
    return f"{value:,.{digits}f}"


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: 0.9923 -> "99.2%". A value strictly between 0 and 1 never
    rounds to "100.0%" or "0.0%" (a calibrated 0.99997 is not certainty): ">99.9%", "<0.1%"."""
    if _missing(value):
        return MISSING
    step = 10.0**-digits
    pct = value * 100
    if 0 < value < 1:
        if round(pct, digits) >= 100:
            return f">{100 - step:.{digits}f}%"
        if round(pct, digits) <= 0:
            return f"<{step:.{digits}f}%"
    return f"{pct:.{digits}f}%"


def points(value: float | None, digits: int = 1) -> str:
    """A difference of two fractions in percentage points, signed: 0.012 -> "+1.2 pp"."""
    if _missing(value):
        return MISSING
    return f"{value * 100:+.{digits}f} pp"


def ms(value: float | None) -> str:
    """Milliseconds with as many digits as matter: "0.42 ms", "4.2 ms", "413 ms", "1.2 s"."""
    if _missing(value):
        return MISSING
    if abs(value) >= 1000:
        return seconds(value / 1000)
    if abs(value) >= 100:
        return f"{value:,.0f} ms"
    if abs(value) >= 1:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def seconds(value: float | None) -> str:
    """A duration: "0.4 s", "42 s", "1 min 4 s", "2 h 5 min", "3 d 4 h"."""
    if _missing(value):
        return MISSING
    sign, value = ("-" if value < 0 else ""), abs(value)
    if value < 10:
        return f"{sign}{value:.1f} s"
    total = round(value)
    if total < 60:
        return f"{sign}{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{sign}{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{sign}{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{sign}{days} d" + (f" {hours} h" if hours else "")


def size(num_bytes: float | int | None) -> str:
    """Bytes in decimal units: "512 B", "1.5 KB", "12.3 MB", "1.20 GB"."""
    if _missing(num_bytes):
        return MISSING
    value = float(num_bytes)
    if abs(value) < 1000:
        return f"{value:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if abs(value) < 1000 or unit == "TB":
            break
    return f"{value:.2f} {unit}" if abs(value) < 10 else f"{value:,.1f} {unit}"


def version(value: int | float | None) -> str:
    """A model version number as people name it: 3 -> "v3" (also 3.0, as pandas has it)."""
    return MISSING if _missing(value) else f"v{int(value)}"


def words(value: str | float | None) -> str:
    """An enum value as words: "low_confidence" -> "low confidence"."""
    return MISSING if _missing(value) or not value else str(value).replace("_", " ")


def short_id(value: str | float | None, length: int = 8) -> str:
    """The head of a uuid or sha256, enough to recognise it."""
    return MISSING if _missing(value) or not value else str(value)[:length]


def as_utc(value: datetime | str | None) -> datetime | None:
    """A datetime (or ISO string) as an aware UTC datetime; naive values are taken as UTC,
    which is how the database stores them."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def timestamp(value: datetime | str | None) -> str:
    """Readable and unambiguous: "29 Nov 2026, 21:54 UTC" (no microseconds, no "T")."""
    when = as_utc(value)
    return MISSING if when is None else when.strftime(TIME_FORMAT).lstrip("0")


def relative(value: datetime | str | None, now: datetime | None = None) -> str:
    """How long ago: "just now", "5 min ago", "3 h ago", "2 days ago"; older than 30 days (or
    in the future by more than a minute) falls back to ``timestamp``."""
    when = as_utc(value)
    if when is None:
        return MISSING
    delta = ((now and as_utc(now)) or datetime.now(UTC)) - when
    secs = delta.total_seconds()
    if secs < -60 or secs >= 30 * 86400:
        return timestamp(when)
    if secs < 60:
        return "just now"
    if secs < 3600:
        return f"{int(secs // 60)} min ago"
    if secs < 86400:
        return f"{int(secs // 3600)} h ago"
    days = int(secs // 86400)
    return "1 day ago" if days == 1 else f"{days} days ago"


def when(value: datetime | str | None, now: datetime | None = None) -> str:
    """Both at once, for a detail view: "5 min ago (29 Nov 2026, 21:54 UTC)"."""
    if as_utc(value) is None:
        return MISSING
    rel, absolute = relative(value, now), timestamp(value)
    return absolute if rel == absolute else f"{rel} ({absolute})"


def metric(name: str, value: float | int | None) -> str:
    """A model metric in its unit, chosen by its name: accuracy, F1, ECE as percentages,
    ``*_ms`` as milliseconds, ``*bytes`` as KB/MB, counts with separators."""
    if _missing(value):
        return MISSING
    key = name.lower()
    if key.endswith("_ms") or "latency" in key:
        return ms(value)
    if "bytes" in key or key == "size":
        return size(value)
    if key.startswith(("accuracy", "ece", "f1", "macro_f1", "recall", "precision")):
        return percent(value, 2)
    if isinstance(value, int) or float(value).is_integer():
        return number(value)
    return f"{value:.4g}"


def metric_delta(name: str, value: float | int | None) -> str:
    """The signed difference of two values of ``metric(name, ...)``: "+1.2 pp", "+3.1 ms",
    "-0.4 MB"."""
    if _missing(value):
        return MISSING
    if "bytes" in name.lower() or "latency" in name.lower() or name.lower().endswith("_ms"):
        text = metric(name, abs(value))
        return ("+" if value >= 0 else "-") + text
    if name.lower().startswith(("accuracy", "ece", "f1", "macro_f1", "recall", "precision")):
        return points(value, 2)
    return f"{value:+,}" if isinstance(value, int) else f"{value:+.4g}"

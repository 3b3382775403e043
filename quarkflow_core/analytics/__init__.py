"""Aggregations for the workbench, computed in SQL (time buckets, GROUP BY, indexes on
created_at): pages never load all rows. Works on Postgres (date_trunc, percentile_cont) and
SQLite (strftime; the same interpolated percentiles by ORDER BY/OFFSET over the filtered
range): both give the same numbers (tests/test_analytics.py).

Every reader works in one project: it takes the keyword ``project_id`` (default: the default
project) and never counts another project's predictions, feedback, review items, snapshots,
training runs or versions (a ``Filters.model_version`` is the project's own version number).

One kind of reader per module: ``filters`` (``Filters``, shared by all queries),
``monitoring`` (``overview``, ``confidence_histogram``, ``class_distribution``, ``drift``),
``listings`` (predictions, feedback, training runs, snapshot diffs), ``api_metrics``
(``api_request_counts`` and ``api_serving``, from the API's /metrics and /readyz rather
than the database). Callers import from
``quarkflow_core.analytics``.
"""

from __future__ import annotations

from quarkflow_core.analytics.api_metrics import api_request_counts, api_serving
from quarkflow_core.analytics.filters import Filters
from quarkflow_core.analytics.listings import (
    count_predictions,
    list_predictions,
    prediction_feedback,
    recent_feedback,
    snapshot_diff,
    training_runs,
)
from quarkflow_core.analytics.monitoring import (
    BUCKETS,
    class_distribution,
    confidence_histogram,
    drift,
    overview,
)

__all__ = [
    "BUCKETS",
    "Filters",
    "api_request_counts",
    "api_serving",
    "class_distribution",
    "confidence_histogram",
    "count_predictions",
    "drift",
    "list_predictions",
    "overview",
    "prediction_feedback",
    "recent_feedback",
    "snapshot_diff",
    "training_runs",
]

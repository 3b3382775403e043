"""What only the API process knows, read from its Prometheus ``/metrics``: requests by outcome
and the outbox gauges. httpx and the Prometheus parser are imported on first use."""

from __future__ import annotations

from typing import Any


def api_request_counts(api_url: str | None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """Requests by outcome since the API process started, from its Prometheus /metrics (the
    rejected and failed ones never reach the database), and the outbox's gauges (depth, dead
    letters, oldest record's age, outage). None when the API is unreachable."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not api_url:
        return None
    try:
        text = httpx.get(api_url.rstrip("/") + "/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    out = {"success": 0, "client_error": 0, "server_error": 0, "by_route": {}, "outbox": {}}
    gauges = {
        "qf_outbox_depth": "depth",
        "qf_outbox_dead_letters": "dead_letters",
        "qf_outbox_oldest_seconds": "oldest_s",
        "qf_outbox_outage": "outage",
    }
    for family in text_string_to_metric_families(text):
        if family.name in gauges and family.samples:
            out["outbox"][gauges[family.name]] = family.samples[0].value
        if family.name != "qf_http_requests":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            status = int(sample.labels.get("status", "0"))
            kind = "success" if status < 400 else "client_error" if status < 500 else "server_error"
            out[kind] += int(sample.value)
            route = sample.labels.get("route", "?")
            out["by_route"][route] = out["by_route"].get(route, 0) + int(sample.value)
    return out


def api_serving(api_url: str | None, project: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """What the API serves in ``project`` (by name), from its ``/readyz``: version, backend,
    device, why that backend (``backend_note``), ``fallback`` when the backend asked for could
    not be used; ``{"ok": False, "error": ...}`` when it serves nothing there. None when the API
    is unreachable."""
    import httpx

    if not api_url:
        return None
    try:
        report = httpx.get(api_url.rstrip("/") + "/readyz", timeout=timeout_s).json()
    except (httpx.HTTPError, ValueError):
        return None
    checks = report.get("checks", {}) if isinstance(report, dict) else {}
    entry = checks.get("projects", {}).get(project)
    return entry if isinstance(entry, dict) else None

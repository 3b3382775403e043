"""A fresh bucket on the fake-gcs-server that `make test` starts."""

from __future__ import annotations

import uuid

import pytest

from quarkflow_core.storage import GCSStorage


def make_gcs(gcs_host: str) -> GCSStorage:
    store = GCSStorage(
        f"qf-test-{uuid.uuid4().hex[:12]}", "pfx", emulator_host=gcs_host, timeout_s=5
    )
    try:
        store.ensure_bucket()
    except Exception as exc:  # pragma: no cover - environment problem
        pytest.fail(
            f"fake-gcs-server not reachable at {gcs_host}: {exc}. "
            "Run `make test` (it starts it) or scripts/services.sh start."
        )
    return store

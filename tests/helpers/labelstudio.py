"""The real Label Studio the tests use (`scripts/services.sh` starts it): where it is, its
token, and a client that fails clearly when it is not running."""

from __future__ import annotations

import os

import httpx
import pytest

from quarkflow_core.labelstudio import LabelStudio

LS_URL = os.environ.get("QF_TEST_LS_URL", "http://127.0.0.1:8080")
LS_TOKEN = os.environ.get("QF_TEST_LS_TOKEN", "0123456789abcdef0123456789abcdef01234567")


def studio_client() -> LabelStudio:
    try:
        httpx.get(f"{LS_URL}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"Label Studio not reachable at {LS_URL}: {exc}. Run `make test`.")
    return LabelStudio(LS_URL, LS_TOKEN)

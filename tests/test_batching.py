"""The micro-batcher's adaptive wait: a lone request runs at once (no blind wait), a batch
waits for the requests announced as being decoded, a request that never comes (a bad upload)
stops the wait, and the wait is capped by the model's own time per batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from quarkflow_core.predictor import MicroBatcher

pytestmark = pytest.mark.unit


class _Model:
    """Stands in for a Predictor: records the batch sizes it ran, each taking ``run_s``."""

    def __init__(self, run_s: float = 0.0) -> None:
        self.run_s = run_s
        self.batches: list[int] = []

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.run_s)
        return np.full((len(batch), 2), 0.5, dtype=np.float32)


def _image() -> np.ndarray:
    return np.zeros((1, 4, 4), dtype=np.uint8)


@pytest.fixture
def batcher():
    made: list[MicroBatcher] = []

    def make(**kwargs) -> MicroBatcher:
        b = MicroBatcher(**kwargs)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def test_a_lone_request_runs_at_once(batcher):
    """Nothing else announced: no wait, even with a long fixed wait configured."""
    b, model = batcher(max_wait_ms=2000, adaptive_wait_ms=2000), _Model()
    started = time.perf_counter()
    with b.coming(1) as announced:
        fut = b.submit(_image(), model, announced=announced)
    fut.result(timeout=10)
    assert time.perf_counter() - started < 1.0
    assert model.batches == [1]


def test_the_fixed_wait_without_adaptive(batcher):
    """adaptive_wait_ms=0: the old behaviour, a fixed wait after the first request."""
    b, model = batcher(max_wait_ms=300, adaptive_wait_ms=0), _Model()
    started = time.perf_counter()
    b.submit(_image(), model).result(timeout=10)
    assert time.perf_counter() - started >= 0.29
    assert model.batches == [1]


def test_a_batch_waits_for_the_requests_being_decoded(batcher):
    """Four announced, one submitted at once and three a little later: one batch of four
    (a fixed 1 ms wait would have run the first alone)."""
    b, model = batcher(max_wait_ms=1, adaptive_wait_ms=5000), _Model()
    with b.coming(4) as announced:
        first = b.submit(_image(), model, announced=announced)
        time.sleep(0.05)  # the others are still being decoded
        rest = [b.submit(_image(), model, announced=announced) for _ in range(3)]
    for fut in [first, *rest]:
        fut.result(timeout=10)
    assert model.batches == [4]


def test_announced_requests_from_several_threads_share_a_batch(batcher):
    b, model = batcher(max_wait_ms=1, adaptive_wait_ms=5000), _Model()
    results = []

    def request(delay: float) -> None:
        with b.coming(1) as announced:
            time.sleep(delay)  # decoding
            fut = b.submit(_image(), model, announced=announced)
        results.append(fut.result(timeout=10))

    # all four announce before the first submits: the batch waits for the others
    barrier = threading.Barrier(4)

    def run(delay: float) -> None:
        barrier.wait()
        request(delay)

    threads = [threading.Thread(target=run, args=(d,)) for d in (0.0, 0.03, 0.06, 0.09)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 4
    assert sum(model.batches) == 4 and len(model.batches) <= 2


def test_a_request_that_never_comes_ends_the_wait(batcher):
    """Two announced, one refused before it is submitted (a bad upload): the batch runs as
    soon as the block ends, not after the cap."""
    b, model = batcher(max_wait_ms=1, adaptive_wait_ms=5000), _Model()
    started = time.perf_counter()
    with b.coming(2) as announced:
        fut = b.submit(_image(), model, announced=announced)
        time.sleep(0.05)
    fut.result(timeout=10)
    assert time.perf_counter() - started < 2.0
    assert model.batches == [1]


def test_the_wait_is_capped_by_half_the_models_time_per_batch(batcher):
    """After batches of 0.2 s the wait for an announced request is at most about 0.1 s."""
    b, model = batcher(max_wait_ms=1, adaptive_wait_ms=5000), _Model(run_s=0.2)
    for _ in range(3):
        b.submit(_image(), model).result(timeout=10)
    assert b.run_s is not None and b.run_s >= 0.15
    with b.coming(2) as announced:
        started = time.perf_counter()
        fut = b.submit(_image(), model, announced=announced)
        fut.result(timeout=10)  # the second never comes while the first waits
        waited = time.perf_counter() - started - model.run_s
        b.submit(_image(), model, announced=announced).result(timeout=10)
    assert waited < 2.0  # well under the 5 s cap: bounded by the model's time
    assert model.batches[-2:] == [1, 1]


def test_not_started_runs_inline():
    b, model = MicroBatcher(adaptive_wait_ms=50), _Model()
    with b.coming(1) as announced:
        out = b.submit(_image(), model, announced=announced).result(timeout=1)
    assert out.shape == (2,) and model.batches == [1] and b._coming == 0

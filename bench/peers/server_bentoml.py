"""BentoML with adaptive batching (up to ``PEER_MAX_BATCH`` images), one worker.
``python -m bentoml serve server_bentoml:Resnet --port PORT`` (run from this folder)."""

from __future__ import annotations

from pathlib import Path

import bentoml
import common
import numpy as np


@bentoml.service(workers=1, traffic={"timeout": 60})
class Resnet:
    def __init__(self) -> None:
        self.session = common.session()

    @bentoml.api(batchable=True, max_batch_size=common.MAX_BATCH, max_latency_ms=10_000)
    def predict(self, files: list[Path]) -> list[dict]:
        return common.predict(
            self.session, np.stack([common.decode(Path(f).read_bytes()) for f in files])
        )

"""The loop simulator: how many answered labels does the review queue save on *your* data?

``simulate_loop`` replays the human-in-the-loop on a labelled data set whose labels the loop
does not see until it "asks": a seed set is labelled up front, a pool is unlabelled, a test set
is kept aside (never seen by the loop: the yardstick). Each round, in a temporary workspace
(SQLite + a local folder) and through the product's own code paths:

1. the champion scores the pool (``batch.predict_keys``: the batch flow's path; predictions are
   logged and the review queue opened, re-scored and closed exactly as in production);
2. a simulated expert answers ``per_round`` images, picked by the strategy: ``random`` (any
   unanswered pool image), ``uncertainty`` or ``diverse`` (the review queue's next items under
   that ``QF_REVIEW_STRATEGY``); answers are feedback records ("correct" / "wrong, it is X" with
   the true label) applied like the API's outbox applies them;
3. retrain on seed + settled labels (``labels.build_training_snapshot``: the growing hold-out
   included), register the candidate, judge it with the promotion policy, approve it when the
   policy passes (otherwise the champion stays, as a careful ML lead would do);
4. the champion's accuracy on the test set is recorded against the number of answered labels.

The result: one curve per (strategy, seed), and a summary per strategy (answered labels needed
to reach random's final accuracy, accuracy at the end, area under the curve), ranges over seeds.

One section per module: ``data`` (``LabelledData``, ``SimulationSpec``, ``split``), ``loop``
(the workspace, ``run_one``, ``simulate_loop``), ``results`` (``summarize_runs``, saving and
loading results, ``curve_rows`` / ``curve_bands``). Callers import from
``quarkflow_core.simulate``.
"""

from __future__ import annotations

from quarkflow_core.simulate.data import (
    IMAGE_SUFFIXES,
    SIM_STRATEGIES,
    LabelledData,
    SimulationSpec,
    split,
)
from quarkflow_core.simulate.loop import Workspace, run_one, simulate_loop
from quarkflow_core.simulate.results import (
    curve_bands,
    curve_rows,
    load_results,
    save_result,
    summarize_runs,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SIM_STRATEGIES",
    "LabelledData",
    "SimulationSpec",
    "Workspace",
    "curve_bands",
    "curve_rows",
    "load_results",
    "run_one",
    "save_result",
    "simulate_loop",
    "split",
    "summarize_runs",
]

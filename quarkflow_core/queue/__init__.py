"""The review queue's rules: what opens an item, what settles or closes it, how urgent it is,
and which items a person sees next. One item per image.

* **Opened** by a prediction below the serving model's calibrated review threshold
  (``low_confidence``), or by a person's "wrong" without a label (``user_disputed``: it needs
  a label from someone).
* **Scored by the current champion**: every new prediction of an image re-scores its item
  (``scored_*``, ``priority``), and when the champion changes the open items are re-scored by
  the new one (``rescore``: the API does it after each swap, ``quarkflow review rescore`` on
  demand). An unanswered item the champion is now sure of **closes itself** (``closed``, with
  the reason in ``note``); it re-opens if a later model is unsure again.
* **Settled by people** (``settle``): the labels people gave (feedback: "correct" confirms the
  prediction, "wrong, it is X" names X; Label Studio annotators' majority) agree ->
  ``resolved`` with that label; they disagree with each other -> ``disputed`` until an analyst
  decides. An analyst's or ML lead's decision (resolve, dismiss as noise) is final.
* **Work to do** is ``open``, ``sent`` (to Label Studio) and ``disputed``: answered items leave
  the queue. The order: disputed items first (priority >= 1), then the champion's uncertainty,
  optionally spread for diversity and class balance (``QF_REVIEW_STRATEGY``, see ``order``).

Each project has its own queue: every function here takes ``project_id`` (default: the default
project), reads only that project's items and gives the items it opens that project.

``rules``: opening, scoring, settling, re-scoring; ``order``: what comes next. Import either
from here.
"""

from quarkflow_core.queue.order import (
    check_strategy,
    diverse_order,
    order,
    probability_vector,
    queue_size,
)
from quarkflow_core.queue.rules import (
    DIVERSE_POOL,
    QUEUE_STATES,
    RESCORED_STATES,
    STRATEGIES,
    UNANSWERED,
    Score,
    feedback_label,
    observe,
    observe_many,
    rescore,
    review_priority,
    settle,
    stale_items,
    uncertainty,
)

__all__ = [
    "DIVERSE_POOL",
    "QUEUE_STATES",
    "RESCORED_STATES",
    "STRATEGIES",
    "UNANSWERED",
    "Score",
    "check_strategy",
    "diverse_order",
    "feedback_label",
    "observe",
    "observe_many",
    "order",
    "probability_vector",
    "queue_size",
    "rescore",
    "review_priority",
    "settle",
    "stale_items",
    "uncertainty",
]

"""The prediction service behind the API and the Gradio demo.

- ``core``: ``PredictionService`` (champion watcher, micro-batcher, durable outbox + flusher,
  predictions, feedback, health), per project;
- ``models``: ``ProjectModels``, one model holder and last-served pointer per project;
- ``tokens``: who a bearer token or a sign-in is, surviving a database outage;
- ``principal``: ``Principal``, the caller detached from any session, and ``ANONYMOUS``;
- ``faults``: an outage versus a record fault, for the outbox's flusher;
- ``metrics``: the Prometheus metrics.
"""

from quarkflow_core.service.core import PredictionService
from quarkflow_core.service.faults import RECORD_FAULTS, is_transient
from quarkflow_core.service.metrics import Metrics
from quarkflow_core.service.models import ProjectModels
from quarkflow_core.service.principal import ANONYMOUS, Principal
from quarkflow_core.service.tokens import TOKEN_CACHE_S, TOKEN_TOUCH_S, TokenCheck

__all__ = [
    "ANONYMOUS",
    "RECORD_FAULTS",
    "TOKEN_CACHE_S",
    "TOKEN_TOUCH_S",
    "Metrics",
    "PredictionService",
    "Principal",
    "ProjectModels",
    "TokenCheck",
    "is_transient",
]

"""The prediction service behind the API and the Gradio demo: one model holder per project +
champion watcher (``service.models``), micro-batcher, durable outbox + flusher, and health. Who
is calling is checked by ``service.tokens``, metrics live in ``service.metrics``, the flusher's
fault rule in ``service.faults``. The web layers only translate HTTP / UI events into these
calls. Every prediction, lookup and feedback belongs to one project (``project_id``, default:
the default project): another project's prediction is NotFound, as an unknown one is."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import (
    DBAPIError,
    OperationalError,
)
from sqlalchemy.orm import Session

from quarkflow_core import registry
from quarkflow_core.config import Settings
from quarkflow_core.database import begin_write, is_unreachable, make_engine, session_scope
from quarkflow_core.errors import (
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
)
from quarkflow_core.images import (
    DecodeBudget,
    ImageInfo,
    give_large_frees_back,
    prepare_uploads,
)
from quarkflow_core.outbox import Flusher, Outbox, Record, outbox_path
from quarkflow_core.predictions import (
    FEEDBACK,
    PREDICTION,
    apply_records,
    feedback_record,
    get_prediction,
    parse_verdict,
    pending_dict,
    prediction_dict,
    prediction_record,
    public_view,
    store_blobs,
)
from quarkflow_core.predictor import MicroBatcher, ModelHolder, NoModel, Predictor, summarize
from quarkflow_core.schema import DEFAULT_PROJECT_ID
from quarkflow_core.service.faults import is_transient
from quarkflow_core.service.metrics import Metrics
from quarkflow_core.service.models import ProjectModels, served_entry
from quarkflow_core.service.principal import Principal
from quarkflow_core.service.tokens import TokenCheck
from quarkflow_core.storage import Storage, storage_from_url

log = logging.getLogger("quarkflow.service")


@dataclass
class _Pending:
    """A classification request between the batcher and the log (``PredictionService``)."""

    predictor: Predictor
    uploads: list[tuple[bytes, str | None]]
    infos: list[ImageInfo]
    futures: list[Future]
    started: float
    principal: Principal
    request_id: str | None
    source: str
    project_id: int


class PredictionService:
    def __init__(
        self,
        settings: Settings,
        *,
        storage: Storage | None = None,
        database_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = make_engine(database_url or settings.database_url)
        self.storage = storage or storage_from_url(
            settings.storage_url,
            emulator_host=settings.storage_emulator_host,
            project=settings.gcs_project,
        )
        self.metrics = Metrics()
        self.batcher = MicroBatcher(
            max_batch=settings.serving_max_batch,
            max_wait_ms=settings.serving_max_wait_ms,
            on_batch=self.metrics.batch_size.observe,
            adaptive_wait_ms=settings.serving_adaptive_wait_ms,
        )
        self.decode_budget = DecodeBudget(
            settings.max_decoding_pixels, wait_s=settings.decode_wait_s
        )
        give_large_frees_back()  # decoded frames' memory returns to the system once freed
        # predict_async's validation, decoding and logging: one thread per core
        self.decode_pool = ThreadPoolExecutor(
            max_workers=max(1, len(os.sched_getaffinity(0))), thread_name_prefix="qf-decode"
        )
        serving_dir = Path(settings.data_dir) / "serving"
        self.outbox = Outbox(outbox_path(settings.data_dir))
        self.flusher = Flusher(self.outbox, self._apply, is_transient=is_transient)
        self.cache_root = registry.model_cache_dir(settings)
        self.models = ProjectModels(
            settings,
            storage=self.storage,
            cache_root=self.cache_root,
            serving_dir=serving_dir,
            session=self.session,
            on_swap=self._on_swap,
        )
        self.holders = self.models.holders  # project id -> ModelHolder
        self.holder: ModelHolder = self.models.holder(DEFAULT_PROJECT_ID)  # the default project's
        self.pointer = self.models.pointer(DEFAULT_PROJECT_ID)
        self.watch_error: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.tokens = TokenCheck(settings, self.session)
        self._rescore_lock = threading.Lock()
        self._rescorers: list[threading.Thread] = []
        self.last_rescore: dict[str, int] | None = None
        self.metrics.outbox_depth.set_function(self.outbox.depth)
        self.metrics.dead_letters.set_function(self.outbox.dead_letters)
        self.metrics.outbox_oldest.set_function(lambda: self.outbox.backlog()["oldest_s"] or 0.0)
        self.metrics.outbox_outage.set_function(lambda: float(self.flusher.last_error is not None))

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, watch: bool = True) -> None:
        self.load_initial()
        self.batcher.start()
        self.flusher.start()
        if watch and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="qf-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        for rescorer in self._rescorers:
            rescorer.join(timeout=30)
        self.batcher.stop()
        self.decode_pool.shutdown(wait=True)
        self.flusher.stop()
        self.outbox.close()
        self.engine.dispose()

    def session(self) -> AbstractContextManager[Session]:
        """``database.session_scope`` on this service's engine: committed when the block ends,
        rolled back when it raises (the API's routes run inside one)."""
        return session_scope(self.engine)

    # ------------------------------------------------------------------ model

    def current(self, project_id: int = DEFAULT_PROJECT_ID) -> Predictor | None:
        """The model a project is served with right now (None: none loaded)."""
        return self.models.current(project_id)

    def project_names(self) -> dict[str, int]:
        """Project name -> id, as of the watcher's last listing (no database call)."""
        return {self.models.name(pid): pid for pid in sorted(self.models.names)}

    def _on_swap(self, project_id: int, predictor: Predictor) -> None:
        self.metrics.swaps.inc()
        self._tune_batching(predictor)
        if project_id == DEFAULT_PROJECT_ID:
            self.metrics.model_version.set(predictor.version or 0)
        if self.settings.review_rescore and predictor.version is not None:
            rescorer = threading.Thread(
                target=self.rescore_queue,
                args=(predictor,),
                kwargs={"project_id": project_id},
                name="qf-rescore",
                daemon=True,
            )
            self._rescorers = [t for t in self._rescorers if t.is_alive()] + [rescorer]
            rescorer.start()

    def _tune_batching(self, predictor: Predictor) -> None:
        """A model on the GPU gets the GPU's micro-batches (``ml.backends.serving_batching``),
        unless QF_SERVING_MAX_BATCH / QF_SERVING_MAX_WAIT_MS were set explicitly."""
        from quarkflow_core.ml.backends import serving_batching

        size, wait_ms = serving_batching(
            predictor.backend_name,
            max_batch=self.settings.serving_max_batch,
            max_wait_ms=self.settings.serving_max_wait_ms,
        )
        explicit = self.settings.model_fields_set
        if "serving_max_batch" not in explicit:
            self.batcher.max_batch = size
        if "serving_max_wait_ms" not in explicit:
            self.batcher.max_wait_s = wait_ms / 1000.0

    def rescore_queue(
        self, predictor: Predictor, *, project_id: int = DEFAULT_PROJECT_ID
    ) -> dict[str, int] | None:
        """Re-score a project's open review items with its newly served champion (one re-score
        at a time; one for a model no longer served is skipped). Errors are logged, not raised:
        the next swap or ``quarkflow review rescore`` catches up."""
        from quarkflow_core.queue import rescore

        with self._rescore_lock:
            if self.models.current(project_id) is not predictor or self._stop.is_set():
                return None
            try:
                with self.session() as s:
                    counts = rescore(
                        s,
                        storage=self.storage,
                        predictor=predictor,
                        threshold=predictor.threshold(self.settings.review_threshold),
                        project_id=project_id,
                    )
            except Exception as exc:
                log.warning("re-scoring the queue with v%s failed: %s", predictor.version, exc)
                return None
            self.last_rescore = {"version": predictor.version, "project_id": project_id, **counts}
            log.info("review queue re-scored with v%s: %s", predictor.version, counts)
            return counts

    def load_initial(self) -> None:
        """Every project's champion from the database; with the database down, the models
        served last (one pointer per project)."""
        try:
            self.refresh_model()
            return
        except (OperationalError, DatabaseUnavailable) as exc:
            log.warning("database unreachable at start (%s); trying the last served models", exc)
        self.models.load_pointers()

    def refresh_model(self, project_id: int | None = None) -> bool:
        """Swap to the current champion of every project (``None``, the projects listed afresh)
        or of one, where it changed: load fully, verify sha256, warm up, then swap. Returns
        True when a swap happened (see ``ProjectModels.refresh`` for failures)."""
        return self.models.refresh(project_id)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            try:
                self.refresh_model()
                self.watch_error = None
            except Exception as exc:  # keep serving the current model; report on /readyz
                self.watch_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("champion check failed: %s", self.watch_error)

    # ------------------------------------------------------------------ who is calling

    def authenticate(self, token: str) -> Principal:
        """A bearer token's user (see ``service.tokens``)."""
        return self.tokens.authenticate(token)

    def principal_for(self, username: str) -> Principal:
        """A signed-in UI user (Gradio / Streamlit) as a Principal."""
        return self.tokens.principal_for(username)

    def check_password(self, username: str, password: str) -> bool:
        return self.tokens.check_password(username, password)

    # ------------------------------------------------------------------ predictions

    def predict(
        self,
        uploads: list[tuple[bytes, str | None]],
        *,
        principal: Principal,
        request_id: str | None = None,
        source: str = "api",
        project_id: int = DEFAULT_PROJECT_ID,
    ) -> list[dict[str, Any]]:
        """Validate every upload first (one bad file rejects the call, nothing is written),
        then predict them with the project's model through the batcher and log each durably
        (in that project) before returning."""
        pending = self._submit(
            uploads,
            principal=principal,
            request_id=request_id,
            source=source,
            project_id=project_id,
        )
        if isinstance(pending, list):  # a detection: answered already
            return pending
        return self._log_predictions(pending, [f.result(timeout=60) for f in pending.futures])

    async def predict_async(
        self,
        uploads: list[tuple[bytes, str | None]],
        *,
        principal: Principal,
        request_id: str | None = None,
        source: str = "api",
        project_id: int = DEFAULT_PROJECT_ID,
    ) -> list[dict[str, Any]]:
        """``predict`` for an event loop (the API's prediction routes): validation and
        decoding run in ``decode_pool`` (as many threads as cores, so concurrent requests do
        not fight over the cores and the GIL the model needs), the model's answer is awaited
        without holding a thread, and the durable log is written in the pool too. The same
        checks, in the same order, and the same guarantee: nothing is returned before every
        record is committed to the outbox."""
        loop = asyncio.get_running_loop()
        pending = await loop.run_in_executor(
            self.decode_pool,
            functools.partial(
                self._submit,
                uploads,
                principal=principal,
                request_id=request_id,
                source=source,
                project_id=project_id,
            ),
        )
        if isinstance(pending, list):
            return pending
        # shielded: a timeout here must not cancel a job the batcher may be running
        probs = [
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(f)), timeout=60)
            for f in pending.futures
        ]
        return await loop.run_in_executor(self.decode_pool, self._log_predictions, pending, probs)

    def _submit(
        self,
        uploads: list[tuple[bytes, str | None]],
        *,
        principal: Principal,
        request_id: str | None,
        source: str,
        project_id: int,
    ) -> _Pending | list[dict[str, Any]]:
        """``predict``'s checks, then every upload decoded and handed to the batcher; a
        detection project's answer in full."""
        if request_id is not None and (len(request_id) > 64 or not request_id.isprintable()):
            raise InvalidInput("request id: at most 64 printable characters", code="invalid_header")
        predictor = self.models.ensure(project_id)
        if predictor is None:
            raise NoModel(self.models.no_model_message(project_id))
        if not uploads:
            raise InvalidInput("no image was uploaded", code="no_file")
        if len(uploads) > self.settings.max_batch_files:
            raise InvalidInput(
                f"{len(uploads)} images in one request; the limit is "
                f"{self.settings.max_batch_files}",
                code="too_many_files",
            )
        if getattr(predictor, "task", "classification") == "detection":
            return self._predict_boxes(
                uploads,
                predictor=predictor,
                principal=principal,
                request_id=request_id,
                source=source,
                project_id=project_id,
            )
        started = time.perf_counter()
        # (info, model input) per image: decoded one at a time under the process's budget,
        # each full-size frame freed as soon as its small input array exists; announced to
        # the batcher meanwhile, so that a batch about to run waits for them (adaptive wait)
        with self.batcher.coming(len(uploads)) as announced:
            infos = prepare_uploads(
                uploads,
                convert=predictor.preprocess_image,
                budget=self.decode_budget,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_image_pixels,
                max_request_pixels=self.settings.max_request_pixels,
                on_reject=lambda code: self.metrics.rejected.labels(code).inc(),
            )
            futures = [
                self.batcher.submit(array, predictor, announced=announced) for _, array in infos
            ]
        return _Pending(
            predictor=predictor,
            uploads=uploads,
            infos=[info for info, _ in infos],
            futures=futures,
            started=started,
            principal=principal,
            request_id=request_id,
            source=source,
            project_id=project_id,
        )

    def _log_predictions(self, pending: _Pending, probs: list[Any]) -> list[dict[str, Any]]:
        """Summarize the model's answers and log each durably; what the caller is told."""
        predictor = pending.predictor
        threshold = predictor.threshold(self.settings.review_threshold)
        out = []
        for (data, _), info, row in zip(pending.uploads, pending.infos, probs, strict=True):
            s = summarize(row, predictor.classes, k=min(5, len(predictor.classes)))
            latency = (time.perf_counter() - pending.started) * 1000
            payload = prediction_record(
                summary=s,
                info=info,
                model_version=predictor.version,
                latency_ms=latency,
                review_threshold=threshold,
                user_id=pending.principal.user_id,
                request_id=pending.request_id,
                source=pending.source,
                project_id=pending.project_id,
            )
            self._log_prediction(payload, data)
            out.append(public_view(payload))
        return out

    def _predict_boxes(
        self,
        uploads: list[tuple[bytes, str | None]],
        *,
        predictor: Any,
        principal: Principal,
        request_id: str | None,
        source: str,
        project_id: int,
    ) -> list[dict[str, Any]]:
        """``predict`` for a detection project: each image's boxes, in its own pixels, logged
        with the summary that decides review (``detection.serving``)."""
        from quarkflow_core.detection.serving import boxes_summary, model_input

        started = time.perf_counter()
        infos = prepare_uploads(
            uploads,
            convert=model_input,
            budget=self.decode_budget,
            max_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
            max_request_pixels=self.settings.max_request_pixels,
            on_reject=lambda code: self.metrics.rejected.labels(code).inc(),
        )
        threshold = predictor.threshold(self.settings.review_threshold)
        out = []
        for (data, _), (info, (array, scale)) in zip(uploads, infos, strict=True):
            summary = boxes_summary(
                predictor,
                array,
                scale=scale,
                width=info.width,
                height=info.height,
                threshold=threshold,
            )
            payload = prediction_record(
                summary=summary,
                info=info,
                model_version=predictor.version,
                latency_ms=(time.perf_counter() - started) * 1000,
                review_threshold=threshold,
                user_id=principal.user_id,
                request_id=request_id,
                source=source,
                project_id=project_id,
            )
            self._log_prediction(payload, data)
            out.append({**public_view(payload), "threshold": round(threshold, 4)})
        return out

    def predict_probabilities(
        self,
        uploads: list[tuple[bytes, str | None]],
        *,
        principal: Principal,
        request_id: str | None = None,
        source: str = "api",
        project_id: int = DEFAULT_PROJECT_ID,
    ) -> tuple[Any, list[dict[str, Any]]]:
        """``predict``, with each image's whole calibrated probability vector as well
        (``probabilities``, in the model's class order: the Open Inference Protocol's output,
        ``quarkflow_core.oip``), and the model that answered. The same checks, batcher and
        durable log as ``predict``; a detection project answers as ``predict`` does."""
        pending = self._submit(
            uploads,
            principal=principal,
            request_id=request_id,
            source=source,
            project_id=project_id,
        )
        if isinstance(pending, list):  # a detection: answered already
            return self.models.current(project_id), pending
        probs = [f.result(timeout=60) for f in pending.futures]
        out = self._log_predictions(pending, probs)
        return pending.predictor, [
            {**answer, "probabilities": row} for answer, row in zip(out, probs, strict=True)
        ]

    def _log_prediction(self, payload: dict[str, Any], data: bytes) -> None:
        """Durable before the answer: the record (and its image) committed to the outbox."""
        self.outbox.append(PREDICTION, payload["id"], payload, data)
        self.metrics.predictions.inc()
        if payload["review"]:
            self.metrics.reviews.inc()

    def _apply(self, records: list[Record]) -> None:
        """Images first, with no database lock held (slow storage must not block the API's
        writers on SQLite), then the rows in one short write transaction."""
        store_blobs(self.storage, records)
        with self.session() as s:
            begin_write(s)
            apply_records(s, self.storage, records, blobs_stored=True)

    def get_prediction(
        self, prediction_id: str, *, project_id: int = DEFAULT_PROJECT_ID
    ) -> dict[str, Any]:
        """A project's prediction, logged or still in the outbox; NotFound for an unknown id
        and for another project's."""
        pending = self.outbox.find(prediction_id, PREDICTION)
        if pending is not None:
            if pending.payload.get("project_id", DEFAULT_PROJECT_ID) != project_id:
                raise NotFound(f"no prediction with id {prediction_id}")
            return pending_dict(pending.payload)
        try:
            with self.session() as s:
                pred = get_prediction(session=s, prediction_id=prediction_id, project_id=project_id)
                if pred is None:
                    raise NotFound(f"no prediction with id {prediction_id}")
                return prediction_dict(s, pred)
        except DBAPIError as exc:
            if not is_unreachable(exc):
                raise
            raise DatabaseUnavailable(
                "the database is unreachable; logged predictions cannot be read right now"
            ) from None

    def feedback(
        self,
        prediction_id: str,
        *,
        verdict: str,
        true_label: str | None,
        comment: str | None,
        principal: Principal,
        project_id: int = DEFAULT_PROJECT_ID,
        boxes: list[dict[str, Any]] | None = None,
        missed: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Acknowledged only once durable (committed to the outbox). The prediction must be the
        project's, the label one of the classes of the project's served model. While the
        database is down the prediction is checked against the ones this server acknowledged
        (any age). A detection takes verdicts per box (``boxes``) and the ``missed`` objects'
        boxes instead of a label (``detection.feedback``)."""
        from quarkflow_core.detection.feedback import check_box_feedback

        v = parse_verdict(verdict)
        try:  # NotFound for unknown ids and other projects' predictions
            pred = self.get_prediction(prediction_id, project_id=project_id)
        except DatabaseUnavailable:
            label = self.outbox.known_label(prediction_id, project_id=project_id)
            if label is None:
                raise DatabaseUnavailable(
                    f"the database is unreachable and prediction {prediction_id} was not made "
                    "by this server, so it cannot be checked now; retry when the database is "
                    "back"
                ) from None
            pred = {"id": prediction_id, "label": label}
            known = self.outbox.known_boxes(prediction_id, project_id=project_id)
            if known is not None:
                pred["boxes"] = known
        served = self.models.current(project_id)
        said = None
        if "boxes" in pred:
            if (true_label or "").strip():
                raise InvalidInput(
                    "this prediction is a detection: send a verdict per box (boxes) and the "
                    "missed objects (missed), not true_label"
                )
            said = check_box_feedback(
                verdict=v,
                predicted=pred["boxes"],
                boxes=boxes,
                missed=missed,
                classes=served.classes if served else [],
                width=pred.get("width"),
                height=pred.get("height"),
            )
        elif boxes or missed:
            raise InvalidInput(
                "boxes and missed are verdicts on a detection's boxes; this prediction is a "
                "classification: send true_label"
            )
        payload = feedback_record(
            prediction_id=prediction_id,
            predicted=pred["label"],
            verdict=v,
            true_label=true_label,
            comment=comment,
            classes=served.classes if served else [],
            user_id=principal.user_id,
            project_id=project_id,
        )
        if said is not None:
            payload["boxes"], payload["true_label"] = said, None
        self.outbox.append(FEEDBACK, payload["id"], payload)
        keys = ("id", "prediction_id", "verdict", "true_label")
        extra = {"boxes": said} if said is not None else {}
        return {**{k: payload[k] for k in keys}, **extra, "durable": True}

    # ------------------------------------------------------------------ health

    def readiness(self) -> dict[str, Any]:
        from sqlalchemy import text

        checks: dict[str, Any] = {}
        current = self.holder.current
        checks["model"] = (
            served_entry(current) if current else {"ok": False, "error": "no model loaded"}
        )
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = {"ok": True}
        except Exception as exc:
            checks["database"] = {"ok": False, "error": str(exc).splitlines()[0][:200]}
        try:
            self.storage.check()
            checks["storage"] = {"ok": True}
        except Exception as exc:
            checks["storage"] = {"ok": False, "error": str(exc)[:200]}
        checks["outbox"] = self.flusher.status()
        if current:
            checks["model"]["batching"] = {
                "max_batch": self.batcher.max_batch,
                "max_wait_ms": round(self.batcher.max_wait_s * 1000, 3),
                "adaptive_wait_ms": round(self.batcher.adaptive_s * 1000, 3),
            }
        if self.watch_error:
            checks["model"]["watch_error"] = self.watch_error
        checks["projects"] = self.models.report()
        # ready once any project's model is served (the default project may have none)
        served = checks["model"]["ok"] or any(p["ok"] for p in checks["projects"].values())
        ready = served and all(checks[k]["ok"] for k in ("database", "storage"))
        return {"ready": ready, "checks": checks}

"""The prediction service behind the API and the Gradio demo: model holder + champion watcher,
micro-batcher, durable outbox + flusher, and health. Who is calling is checked by
``service.tokens``, metrics live in ``service.metrics``, the flusher's fault rule in
``service.faults``. The web layers only translate HTTP / UI events into these calls."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import AbstractContextManager
from datetime import UTC, datetime
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
from quarkflow_core.images import DecodeBudget, give_large_frees_back, prepare_uploads
from quarkflow_core.outbox import Flusher, Outbox, Record, outbox_path
from quarkflow_core.predictions import (
    FEEDBACK,
    PREDICTION,
    apply_records,
    get_prediction,
    parse_verdict,
    prediction_dict,
    prediction_record,
    public_view,
    store_blobs,
)
from quarkflow_core.predictor import (
    MicroBatcher,
    ModelHolder,
    NoModel,
    Predictor,
    read_pointer,
    summarize,
    write_pointer,
)
from quarkflow_core.schema import Verdict
from quarkflow_core.service.faults import is_transient
from quarkflow_core.service.metrics import Metrics
from quarkflow_core.service.principal import Principal
from quarkflow_core.service.tokens import TokenCheck
from quarkflow_core.storage import Storage, storage_from_url

log = logging.getLogger("quarkflow.service")


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
        self.holder = ModelHolder()
        self.holder.listeners.append(self._on_swap)
        self.batcher = MicroBatcher(
            max_batch=settings.serving_max_batch,
            max_wait_ms=settings.serving_max_wait_ms,
            on_batch=self.metrics.batch_size.observe,
        )
        self.decode_budget = DecodeBudget(
            settings.max_decoding_pixels, wait_s=settings.decode_wait_s
        )
        give_large_frees_back()  # decoded frames' memory returns to the system once freed
        serving_dir = Path(settings.data_dir) / "serving"
        self.outbox = Outbox(outbox_path(settings.data_dir))
        self.flusher = Flusher(self.outbox, self._apply, is_transient=is_transient)
        self.pointer = serving_dir / "current.json"
        self.cache_root = registry.model_cache_dir(settings)
        self.watch_error: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.tokens = TokenCheck(settings, self.session)
        self._rescore_lock = threading.Lock()
        self._rescorer: threading.Thread | None = None
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
        if self._rescorer is not None:
            self._rescorer.join(timeout=30)
        self.batcher.stop()
        self.flusher.stop()
        self.outbox.close()
        self.engine.dispose()

    def session(self) -> AbstractContextManager[Session]:
        """``database.session_scope`` on this service's engine: committed when the block ends,
        rolled back when it raises (the API's routes run inside one)."""
        return session_scope(self.engine)

    # ------------------------------------------------------------------ model

    def _on_swap(self, predictor: Predictor) -> None:
        self.metrics.swaps.inc()
        self.metrics.model_version.set(predictor.version or 0)
        if self.settings.review_rescore and predictor.version is not None:
            self._rescorer = threading.Thread(
                target=self.rescore_queue, args=(predictor,), name="qf-rescore", daemon=True
            )
            self._rescorer.start()

    def rescore_queue(self, predictor: Predictor) -> dict[str, int] | None:
        """Re-score the open review items with a newly served champion (one at a time; a
        re-score for a model no longer served is skipped). Errors are logged, not raised: the
        next swap or ``quarkflow review rescore`` catches up."""
        from quarkflow_core.queue import rescore

        with self._rescore_lock:
            if self.holder.current is not predictor or self._stop.is_set():
                return None
            try:
                with self.session() as s:
                    counts = rescore(
                        s,
                        storage=self.storage,
                        predictor=predictor,
                        threshold=predictor.threshold(self.settings.review_threshold),
                    )
            except Exception as exc:
                log.warning("re-scoring the queue with v%s failed: %s", predictor.version, exc)
                return None
            self.last_rescore = {"version": predictor.version, **counts}
            log.info("review queue re-scored with v%s: %s", predictor.version, counts)
            return counts

    def load_initial(self) -> None:
        """The champion from the database; with the database down, the model served last."""
        try:
            self.refresh_model()
            return
        except (OperationalError, DatabaseUnavailable) as exc:
            log.warning("database unreachable at start (%s); trying the last served model", exc)
        pointer = read_pointer(self.pointer)
        if pointer:
            predictor = Predictor.from_artifact(
                pointer["path"],
                version=pointer["version"],
                backend=self.settings.serving_backend,
            )
            if predictor.sha256 == pointer["sha256"]:
                predictor.warm_up()
                self.holder.swap(predictor)

    def refresh_model(self) -> bool:
        """Swap to the current champion if it changed: load fully, verify sha256, warm up,
        then swap. Returns True when a swap happened."""
        with self.session() as s:
            row = registry.alias_of(session=s, alias=registry.CHAMPION)
            if row is None:
                return False
            current = self.holder.current
            if current is not None and current.sha256 == row.sha256:
                return False
            path = registry.materialize(storage=self.storage, row=row, cache_root=self.cache_root)
            version = row.version
        predictor = Predictor.from_artifact(
            path, version=version, backend=self.settings.serving_backend
        )
        predictor.warm_up()
        self.holder.swap(predictor)
        write_pointer(self.pointer, predictor, path)
        return True

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
    ) -> list[dict[str, Any]]:
        """Validate every upload first (one bad file rejects the call, nothing is written),
        then predict them through the batcher and log each durably before returning."""
        if request_id is not None and (len(request_id) > 64 or not request_id.isprintable()):
            raise InvalidInput("request id: at most 64 printable characters", code="invalid_header")
        predictor = self.holder.current
        if predictor is None:
            raise NoModel(
                "no model is being served yet: approve a version (`quarkflow models approve`) "
                "or run `make demo`"
            )
        if not uploads:
            raise InvalidInput("no image was uploaded", code="no_file")
        if len(uploads) > self.settings.max_batch_files:
            raise InvalidInput(
                f"{len(uploads)} images in one request; the limit is "
                f"{self.settings.max_batch_files}",
                code="too_many_files",
            )
        started = time.perf_counter()
        # (info, model input) per image: decoded one at a time under the process's budget,
        # each full-size frame freed as soon as its small input array exists
        infos = prepare_uploads(
            uploads,
            convert=predictor.preprocess_image,
            budget=self.decode_budget,
            max_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
            max_request_pixels=self.settings.max_request_pixels,
            on_reject=lambda code: self.metrics.rejected.labels(code).inc(),
        )
        futures = [self.batcher.submit(array, predictor) for _, array in infos]
        threshold = predictor.threshold(self.settings.review_threshold)
        out = []
        for (data, _), (info, _), fut in zip(uploads, infos, futures, strict=True):
            probs = fut.result(timeout=60)
            s = summarize(probs, predictor.classes, k=min(5, len(predictor.classes)))
            latency = (time.perf_counter() - started) * 1000
            payload = prediction_record(
                summary=s,
                info=info,
                model_version=predictor.version,
                latency_ms=latency,
                review_threshold=threshold,
                user_id=principal.user_id,
                request_id=request_id,
                source=source,
            )
            self.outbox.append(PREDICTION, payload["id"], payload, data)
            self.metrics.predictions.inc()
            if payload["review"]:
                self.metrics.reviews.inc()
            out.append(public_view(payload))
        return out

    def _apply(self, records: list[Record]) -> None:
        """Images first, with no database lock held (slow storage must not block the API's
        writers on SQLite), then the rows in one short write transaction."""
        store_blobs(self.storage, records)
        with self.session() as s:
            begin_write(s)
            apply_records(s, self.storage, records, blobs_stored=True)

    def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        pending = self.outbox.find(prediction_id, PREDICTION)
        if pending is not None:
            p = pending.payload
            return {
                "id": p["id"],
                "label": p["label"],
                "confidence": p["confidence"],
                "topk": p["topk"],
                "model_version": p["model_version"],
                "latency_ms": p["latency_ms"],
                "created_at": p["created_at"],
                "image_sha256": p["image"]["sha256"],
                "logged": False,  # acknowledged, still in the outbox
                "feedback": [],
                "review": {"state": "pending", "reason": "low_confidence"} if p["review"] else None,
            }
        try:
            with self.session() as s:
                pred = get_prediction(session=s, prediction_id=prediction_id)
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
    ) -> dict[str, Any]:
        """Acknowledged only once durable (committed to the outbox). While the database is down
        the prediction is checked against the ones this server acknowledged (any age)."""
        v = parse_verdict(verdict)
        try:
            pred = self.get_prediction(prediction_id)  # NotFound for unknown ids
        except DatabaseUnavailable:
            label = self.outbox.known_label(prediction_id)
            if label is None:
                raise DatabaseUnavailable(
                    f"the database is unreachable and prediction {prediction_id} was not made "
                    "by this server, so it cannot be checked now; retry when the database is "
                    "back"
                ) from None
            pred = {"id": prediction_id, "label": label}
        classes = self.holder.current.classes if self.holder.current else []
        true_label = (true_label or "").strip() or None
        if true_label is not None and classes and true_label not in classes:
            raise InvalidInput(
                f"unknown label {true_label!r}; valid labels: {', '.join(classes)}",
                code="unknown_label",
            )
        if v == Verdict.CORRECT and true_label not in (None, pred["label"]):
            raise InvalidInput(
                f"verdict 'correct' but true_label {true_label!r} differs from the predicted "
                f"{pred['label']!r}; send verdict 'wrong'",
            )
        if v == Verdict.CORRECT:
            true_label = pred["label"]
        if comment is not None and len(comment) > 2000:
            raise InvalidInput("comment too long: at most 2000 characters")
        if comment is not None and any(ord(c) < 32 and c not in "\t\n\r" for c in comment):
            raise InvalidInput("comment: must not contain NUL or other control characters")
        fid = str(uuid.uuid4())
        payload = {
            "id": fid,
            "prediction_id": prediction_id,
            "verdict": v.value,
            "true_label": true_label,
            "comment": comment,
            "user_id": principal.user_id,
            "created_at": datetime.now(UTC).isoformat(),
        }
        self.outbox.append(FEEDBACK, fid, payload)
        return {
            "id": fid,
            "prediction_id": prediction_id,
            "verdict": v.value,
            "true_label": true_label,
            "durable": True,
        }

    # ------------------------------------------------------------------ health

    def readiness(self) -> dict[str, Any]:
        from sqlalchemy import text

        checks: dict[str, Any] = {}
        current = self.holder.current
        checks["model"] = (
            {"ok": True, "version": current.version, "backend": current.backend_name}
            if current
            else {"ok": False, "error": "no model loaded"}
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
        if self.watch_error:
            checks["model"]["watch_error"] = self.watch_error
        ready = all(checks[k]["ok"] for k in ("model", "database", "storage"))
        return {"ready": ready, "checks": checks}

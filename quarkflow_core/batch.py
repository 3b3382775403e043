"""Batch prediction over a storage prefix: the same Predictor, validation and logged records as
the API (written straight to the database, since a batch job is not answering anyone), in one
project (``project_id``: its champion predicts, its images and predictions are written)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.images import ALLOWED_FORMATS, validate_upload
from quarkflow_core.outbox import Record
from quarkflow_core.predictions import PREDICTION, apply_records, prediction_record
from quarkflow_core.predictor import Predictor, summarize
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Image, ReviewItem
from quarkflow_core.storage import Storage

IMAGE_SUFFIXES = {f".{e}" for e in ALLOWED_FORMATS.values()} | {".jpeg", ".tiff"}
_PREDICTORS: dict[tuple[int, str], Predictor] = {}  # per process: (project, sha256) -> champion


def list_images(storage: Storage, prefix: str) -> list[str]:
    return [k for k in storage.list(prefix) if Path(k).suffix.lower() in IMAGE_SUFFIXES]


def champion_predictor(
    *,
    session: Session,
    storage: Storage,
    cache_root: str | Path,
    project_id: int = DEFAULT_PROJECT_ID,
) -> Predictor:
    """The project's current champion, loaded once per process (verified on first load)."""
    from quarkflow_core import registry

    row = registry.alias_of(session=session, alias=registry.CHAMPION, project_id=project_id)
    if row is None:
        raise NotFound("there is no champion model to predict with")
    key = (project_id, row.sha256)  # the same artifact may be another project's v-number
    if key not in _PREDICTORS:
        from quarkflow_core.service.models import load_served

        path = registry.materialize(storage=storage, row=row, cache_root=cache_root)
        _PREDICTORS[key] = load_served(path, version=row.version)
    return _PREDICTORS[key]


def _detect_records(
    valid: list[tuple[str, bytes, Any]],
    images: list[Any],
    *,
    predictor: Any,
    threshold: float,
    project_id: int,
) -> list[Record]:
    """The logged records of a detector's boxes on decoded images (``detection.serving``)."""
    from quarkflow_core.detection.serving import detect_summary

    out = []
    for (key, data, info), image in zip(valid, images, strict=True):
        t0 = time.perf_counter()
        summary = detect_summary(
            predictor, image, width=info.width, height=info.height, threshold=threshold
        )
        payload = prediction_record(
            summary=summary,
            info=info,
            model_version=predictor.version,
            latency_ms=(time.perf_counter() - t0) * 1000,
            review_threshold=threshold,
            request_id=key[:64],
            source="batch",
            project_id=project_id,
        )
        out.append(Record(0, PREDICTION, payload["id"], payload, data, 0))
    return out


def predict_keys(
    *,
    session: Session,
    source: Storage,
    storage: Storage,
    keys: list[str],
    predictor: Predictor,
    review_threshold: float,
    batch_size: int = 32,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Predict the images at ``keys`` in ``source`` and log them in the project (blobs to
    ``storage``, rows to the database) in the caller's transaction (it commits). Invalid files
    are reported, not logged."""
    records, errors, done = [], [], []
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        valid, arrays = [], []
        for key in chunk:
            data = source.get(key)
            try:
                info, image = validate_upload(data)
            except InvalidInput as exc:
                errors.append({"key": key, "error": exc.code, "detail": exc.detail})
                continue
            valid.append((key, data, info))
            if getattr(predictor, "task", None) == "detection":
                arrays.append(image)  # detected one by one below
            else:
                arrays.append(predictor.preprocess_image(image))
        if not valid:
            continue
        if getattr(predictor, "task", None) == "detection":
            records += _detect_records(
                valid,
                arrays,
                predictor=predictor,
                threshold=review_threshold,
                project_id=project_id,
            )
            done += [key for key, _, _ in valid]
            continue
        import numpy as np

        t0 = time.perf_counter()
        probs = predictor.probabilities(np.stack(arrays))
        per_image_ms = (time.perf_counter() - t0) * 1000 / len(valid)
        for (key, data, info), row in zip(valid, probs, strict=True):
            payload = prediction_record(
                summary=summarize(row, predictor.classes, k=min(5, len(predictor.classes))),
                info=info,
                model_version=predictor.version,
                latency_ms=per_image_ms,
                review_threshold=review_threshold,
                request_id=key[:64],
                source="batch",
                project_id=project_id,
            )
            records.append(Record(0, PREDICTION, payload["id"], payload, data, 0))
            done.append(key)
    begin_write(session)
    apply_records(session, storage, records)
    shas = [r.payload["image"]["sha256"] for r in records]
    items = dict(
        session.execute(
            select(Image.sha256, ReviewItem.id)
            .join(ReviewItem, ReviewItem.image_id == Image.id)
            .where(Image.project_id == project_id, Image.sha256.in_(shas))
        ).all()
    )
    return {
        "predicted": len(records),
        "review": sum(1 for r in records if r.payload["review"]),
        "errors": errors,
        "labels": [r.payload["label"] for r in records],
        "predictions": [
            {
                "key": key,
                "prediction_id": r.payload["id"],
                "image_sha256": sha,
                "label": r.payload["label"],
                "confidence": r.payload["confidence"],
                "review": r.payload["review"],
                "review_item_id": items.get(sha) if r.payload["review"] else None,
            }
            for r, sha, key in zip(records, shas, done, strict=True)
        ],
    }

"""`batch_predict`: predict every image under a storage prefix (file:// or gs://), logged like
the API does, on a Dask task runner: a local cluster by default, a real one by address. The
images and predictions belong to one project (parameter ``project``, default ``default``),
predicted by its champion."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect_dask import DaskTaskRunner

from flows.common import db, resolve_project, storage, storage_at
from quarkflow_core.config import get_settings
from quarkflow_core.schema import DEFAULT_PROJECT


@task(name="predict-chunk", retries=2, retry_delay_seconds=2)
def predict_chunk(keys: list[str], source_url: str | None, project_id: int) -> dict[str, Any]:
    from quarkflow_core.batch import champion_predictor, predict_keys
    from quarkflow_core.registry import model_cache_dir

    settings = get_settings()
    dest, source = storage(), storage_at(source_url)
    with db() as s:
        predictor = champion_predictor(
            session=s, storage=dest, cache_root=model_cache_dir(), project_id=project_id
        )
        return predict_keys(
            session=s,
            source=source,
            storage=dest,
            keys=keys,
            predictor=predictor,
            review_threshold=predictor.threshold(settings.review_threshold),
            project_id=project_id,
        )


def task_runner(address: str | None = None, workers: int = 2) -> DaskTaskRunner:
    """A DaskTaskRunner on an existing cluster (``address``) or a local one."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": False}
    )


@flow(name="batch_predict", log_prints=True, task_runner=task_runner())
def batch_predict(
    prefix: str,
    source_url: str | None = None,
    chunk_size: int = 64,
    project: str = DEFAULT_PROJECT,
) -> dict[str, Any]:
    """Predict all images under ``prefix`` of ``source_url`` (default: QF_STORAGE_URL) into a
    project, with its champion."""
    from quarkflow_core.batch import list_images

    pid = resolve_project(project)
    source = storage_at(source_url)
    keys = list_images(source, prefix)
    chunks = [keys[i : i + chunk_size] for i in range(0, len(keys), chunk_size)]
    futures = [predict_chunk.submit(chunk, source_url, pid) for chunk in chunks]
    bar = create_progress_artifact(progress=0.0, description=f"batch prediction of {prefix}")
    results = []
    for i, future in enumerate(futures, start=1):
        results.append(future.result())
        update_progress_artifact(bar, progress=100.0 * i / len(futures))
        print(f"chunk {i}/{len(futures)}: {sum(r['predicted'] for r in results)} predicted")
    predictions = [p for r in results for p in r["predictions"]]
    summary = {
        "images": len(keys),
        "chunks": len(chunks),
        "predicted": sum(r["predicted"] for r in results),
        "review": sum(r["review"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "predictions": predictions,
        "review_items": sorted({p["review_item_id"] for p in predictions if p["review_item_id"]}),
    }
    create_markdown_artifact(
        key="batch-predict-report",
        markdown=(
            f"# Batch prediction of `{prefix}`\n\n| images | predicted | to review | rejected |\n"
            f"|---|---|---|---|\n| {summary['images']} | {summary['predicted']} | "
            f"{summary['review']} | {len(summary['errors'])} |"
        ),
    )
    print(f"predicted {summary['predicted']} of {summary['images']} images")
    return summary

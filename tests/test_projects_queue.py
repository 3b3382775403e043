"""Each project has its own review queue (docs/projects.md): the order, size, staleness and
re-scoring of one project's queue never touch another's items, even for the same image bytes; a
decision on another project's item is NotFound like an unknown id, and a grant in one project
is no role in another; Label Studio annotations land on the right project's images, a webhook's
Label Studio project names ours, and a second project syncs with its own Label Studio project.
The demo seed goes into a project. On SQLite and Postgres, through the core functions the API,
CLI, flows and pages call."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
from helpers.labelstudio import LS_TOKEN, LS_URL, studio_client
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app import cli
from quarkflow_core import migrations, queue
from quarkflow_core.config import get_settings, load_settings
from quarkflow_core.database import make_engine
from quarkflow_core.demo_data import DEMO_CLASSES, already_predicted, demo_pngs, seed_demo
from quarkflow_core.errors import InvalidInput, NotFound, PermissionDenied
from quarkflow_core.images import image_row, probe_image, store_blob
from quarkflow_core.labelstudio import LabelStudio, PulledAnnotation, webhook_project
from quarkflow_core.labelstudio import Project as LsProject
from quarkflow_core.projects import create_project, grant
from quarkflow_core.review import (
    dismiss_as_noise,
    ls_title,
    project_classes,
    project_for_labelstudio,
    record_annotations,
    resolve_item,
    sync_from_settings,
)
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Annotation,
    AuditLog,
    Feedback,
    Image,
    Prediction,
    Project,
    ReviewItem,
    ReviewState,
    Role,
    Verdict,
)
from quarkflow_core.storage import LocalStorage
from quarkflow_core.users import create_user

pytestmark = pytest.mark.integration
DIGITS = [str(d) for d in range(10)]
PNGS, TRUTH = demo_pngs(10)
SHAS = [probe_image(p).sha256 for p in PNGS]


def _score(confidence: float, *, version: int = 1, threshold: float = 0.9) -> queue.Score:
    """The model says "1" at ``confidence`` and "7" with the rest."""
    rest = 1.0 - confidence
    entropy = -sum(p * math.log(p) for p in (confidence, rest) if p > 0) / math.log(10)
    return queue.Score(
        version=version,
        label="1",
        confidence=confidence,
        topk=[{"label": "1", "confidence": confidence}, {"label": "7", "confidence": rest}],
        margin=abs(confidence - rest),
        entropy=entropy,
        unsure=confidence < threshold,
        threshold=threshold,
    )


def _queue(s, project_id: int, idx, *, storage=None) -> list[ReviewItem]:
    """One image, one unsure prediction and its open review item per demo digit ``idx``, in the
    project (the same digits in two projects are two images with the same sha256)."""
    items = []
    for k in idx:
        info = probe_image(PNGS[k])
        if storage is not None:
            store_blob(storage, PNGS[k], info)
        image = image_row(info, source="test", project_id=project_id)
        s.add(image)
        s.flush()
        score = _score(0.5 + 0.06 * k)  # the lower k, the more uncertain
        pred = Prediction(
            project_id=project_id,
            image_id=image.id,
            label=score.label,
            confidence=score.confidence,
            topk=score.topk,
            latency_ms=1.0,
        )
        s.add(pred)
        s.flush()
        item = queue.observe(
            s, image_id=image.id, prediction_id=pred.id, score=score, project_id=project_id
        )
        assert item is not None and item.project_id == project_id
        items.append(item)
    return items


def _ids(items) -> set[int]:
    return {i.id for i in items}


def _snapshot(s, items) -> list[tuple]:
    s.expire_all()
    rows = [s.get(ReviewItem, i.id) for i in items]
    return [(r.state, r.scored_version, r.priority, r.resolved_label, r.note) for r in rows]


def test_each_project_orders_counts_and_settles_only_its_own_items(db_session):
    s = db_session
    birds = create_project(session=s, name="birds", classes=DIGITS).id
    mine = _queue(s, DEFAULT_PROJECT_ID, range(6))
    theirs = _queue(s, birds, range(4))  # the same first four digits, in birds
    assert {i.image_id for i in mine}.isdisjoint(i.image_id for i in theirs)
    disputed = theirs[0]
    disputed.state, disputed.priority = ReviewState.DISPUTED, 1.5
    s.flush()

    assert queue.queue_size(s) == 6 and queue.queue_size(s, project_id=birds) == 4
    assert queue.queue_size(s, (ReviewState.DISPUTED,), project_id=birds) == 1
    assert queue.queue_size(s, (ReviewState.DISPUTED,)) == 0
    for strategy in queue.STRATEGIES:
        ours = queue.order(s, strategy=strategy, limit=50)
        assert len(ours) == 6 and set(ours) == _ids(mine)
        other = queue.order(s, strategy=strategy, limit=50, project_id=birds)
        assert other[0] == disputed.id and set(other) == _ids(theirs)  # its urgent item first
        assert queue.order(s, strategy=strategy, limit=2, project_id=birds) == other[:2]
    # most uncertain first
    assert queue.order(s, strategy="uncertainty", limit=6) == [i.id for i in mine]
    # staleness is per project: a new champion of birds (v2) has only birds' items to score
    assert queue.stale_items(s, version=1) == []
    assert queue.stale_items(s, version=1, project_id=birds) == []
    stale = queue.stale_items(s, version=2, project_id=birds)
    assert set(stale) == _ids(theirs) - {disputed.id}  # a disputed item is not rescored
    assert set(queue.stale_items(s, version=2)) == _ids(mine)
    assert queue.stale_items(s, version=2, limit=2) == [i.id for i in mine[:2]]

    # an expert confirms birds' digit 1: its item settles, the default project's twin stays open
    before = _snapshot(s, mine)
    s.add(Feedback(prediction_id=theirs[1].prediction_id, verdict=Verdict.CORRECT))
    s.flush()
    image_id = theirs[1].image_id
    assert queue.settle(s, image_id=image_id, project_id=birds) == ReviewState.RESOLVED
    assert s.get(ReviewItem, theirs[1].id).resolved_label == "1"
    assert _snapshot(s, mine) == before
    assert queue.queue_size(s, project_id=birds) == 3 and queue.queue_size(s) == 6
    # an item that a settle opens gets the project too (feedback on a confident prediction)
    (confident,) = _queue(s, birds, [5])
    s.delete(confident)
    s.flush()
    assert queue.settle(s, image_id=confident.image_id, project_id=birds) == ReviewState.OPEN
    opened = s.scalar(select(ReviewItem).where(ReviewItem.image_id == confident.image_id))
    assert opened.project_id == birds

    # the demo traffic check counts a project's own predictions only
    assert already_predicted(session=s, shas=SHAS, project_id=birds) == set(SHAS[:4] + SHAS[5:6])
    assert already_predicted(session=s, shas=SHAS) == set(SHAS[:6])


class _SureOfThree:
    """A champion (v7) that is 99% sure every image is a 3."""

    version = 7
    classes = DIGITS

    def __init__(self) -> None:
        self.seen = 0

    def preprocess_image(self, img) -> np.ndarray:
        return np.zeros((1, 28, 28), dtype=np.uint8)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.seen += len(batch)
        out = np.full((len(batch), 10), 0.01 / 9)
        out[:, 3] = 0.99
        return out


def test_rescore_scores_and_closes_only_its_projects_items(db_session, tmp_path):
    s, storage = db_session, LocalStorage(tmp_path / "store")
    storage.prepare()
    birds = create_project(session=s, name="birds", classes=DIGITS).id
    mine = _queue(s, DEFAULT_PROJECT_ID, range(6), storage=storage)
    theirs = _queue(s, birds, range(3), storage=storage)
    s.commit()
    before = _snapshot(s, mine)
    champion = _SureOfThree()

    counts = queue.rescore(
        s, storage=storage, predictor=champion, threshold=0.9, chunk=2, project_id=birds
    )
    assert counts == {"rescored": 3, "closed": 3, "reopened": 0, "unreadable": 0}
    assert champion.seen == 3  # birds' images only were scored
    for state, version, _, _, note in _snapshot(s, theirs):
        assert state == ReviewState.CLOSED and version == 7 and note.startswith("v7 is now")
    assert _snapshot(s, mine) == before  # the default project's queue: untouched
    assert queue.queue_size(s, project_id=birds) == 0 and queue.queue_size(s) == 6
    assert queue.stale_items(s, version=7, project_id=birds) == []
    assert set(queue.stale_items(s, version=7)) == _ids(mine)

    counts = queue.rescore(s, storage=storage, predictor=champion, threshold=0.9)
    assert counts["rescored"] == 6 and counts["closed"] == 6 and champion.seen == 9


def test_a_decision_on_another_projects_item_is_not_found(db_session):
    s = db_session
    birds = create_project(session=s, name="birds", classes=DIGITS).id
    analyst = create_user(session=s, username="pq-analyst", role=Role.ANALYST)
    expert = create_user(session=s, username="pq-expert", role=Role.DOMAIN_EXPERT)
    grant(session=s, project_id=birds, user=expert, role=Role.ANALYST, granted_by="test")
    (mine,) = _queue(s, DEFAULT_PROJECT_ID, [0])
    theirs = _queue(s, birds, [0, 1])
    s.commit()

    unknown = max(i.id for i in [mine, *theirs]) + 1000
    for item_id in (theirs[0].id, unknown):  # another project's item answers like an unknown id
        with pytest.raises(NotFound, match=f"^no review item {item_id}$"):
            resolve_item(session=s, item_id=item_id, label="3", user=analyst, classes=DIGITS)
        with pytest.raises(NotFound, match=f"^no review item {item_id}$"):
            dismiss_as_noise(session=s, item_id=item_id, user=analyst)
    with pytest.raises(NotFound, match=f"^no review item {mine.id}$"):
        dismiss_as_noise(session=s, item_id=mine.id, user=analyst, project_id=birds)
    assert {s.get(ReviewItem, i.id).state for i in theirs} == {ReviewState.OPEN}

    done = resolve_item(
        session=s, item_id=theirs[0].id, label="3", user=analyst, classes=DIGITS, project_id=birds
    )
    assert (done.state, done.resolved_label, done.decided_by_id) == (
        ReviewState.RESOLVED,
        "3",
        analyst.id,
    )
    # the expert is an analyst in birds only: they may dismiss there, and are refused here
    gone = dismiss_as_noise(session=s, item_id=theirs[1].id, user=expert, project_id=birds)
    assert gone.state == ReviewState.DISMISSED
    with pytest.raises(PermissionDenied):
        resolve_item(session=s, item_id=mine.id, label="3", user=expert, classes=DIGITS)
    assert s.get(ReviewItem, mine.id).state == ReviewState.OPEN
    audit = {
        (a.action, a.outcome, a.actor): a.detail
        for a in s.scalars(select(AuditLog).where(AuditLog.action.like("review.%")))
    }
    assert audit[("review.resolve", "ok", "pq-analyst")] == {"label": "3", "project_id": birds}
    assert audit[("review.dismiss", "ok", "pq-expert")] == {"project_id": birds}
    denied = audit[("review.resolve", "denied", "pq-expert")]
    assert denied["project_id"] == DEFAULT_PROJECT_ID and denied["role"] == "domain_expert"


def _pulled(task_id: int, k: int, label: str) -> PulledAnnotation:
    return PulledAnnotation(task_id, task_id * 10, SHAS[k], label, "annotator", None)


def test_annotations_land_on_the_projects_images(db_session):
    s = db_session
    birds = create_project(session=s, name="birds", classes=DIGITS).id
    mine = _queue(s, DEFAULT_PROJECT_ID, range(5))
    theirs = _queue(s, birds, range(3))
    before = _snapshot(s, mine)
    base = 9_000_000
    got = record_annotations(
        session=s,
        pulled=[_pulled(base + k, k, TRUTH[k]) for k in range(3)]
        + [_pulled(base + 4, 4, "4")],  # digit 4 is an image of the default project only
        project_id=birds,
    )
    assert got == {"created": 3, "updated": 0, "unknown_images": 1, "resolved": 3}
    theirs_images = {i.image_id for i in theirs}
    labelled = s.execute(select(Annotation.image_id, Annotation.label)).all()
    assert {i for i, _ in labelled} == theirs_images
    s.expire_all()
    assert [s.get(ReviewItem, i.id).resolved_label for i in theirs] == TRUTH[:3]
    assert _snapshot(s, mine) == before

    # the same digit annotated in the default project's Label Studio lands on its own image
    got = record_annotations(session=s, pulled=[_pulled(base + 5, 0, TRUTH[0])])
    assert got["created"] == 1 and got["resolved"] == 1
    assert s.get(ReviewItem, mine[0].id).resolved_label == TRUTH[0]
    assert (
        s.scalar(
            select(Image.project_id)
            .join(Annotation, Annotation.image_id == Image.id)
            .where(Annotation.external_task_id == str(base + 5))
        )
        == DEFAULT_PROJECT_ID
    )


def test_a_webhooks_label_studio_project_names_ours(db_session):
    s = db_session
    body = {"action": "ANNOTATION_CREATED", "task": {"id": 3, "project": 41}}
    assert webhook_project({**body, "project": {"id": 41, "title": "T · birds"}}) == (
        41,
        "T · birds",
    )
    assert webhook_project(body) == (41, None)
    assert webhook_project({"task": {"project": "42"}}) == (42, None)
    assert webhook_project({"action": "ANNOTATION_CREATED"}) == (None, None)
    with pytest.raises(InvalidInput):
        webhook_project({"project": {"id": "drop table"}})

    settings = load_settings(labelstudio_project="QF review")
    birds = create_project(session=s, name="birds", classes=DIGITS)
    default = s.get(Project, DEFAULT_PROJECT_ID)
    assert ls_title(settings, default) == "QF review"
    assert ls_title(settings, birds) == "QF review · birds"
    birds.labelstudio_project_id = 41
    s.flush()
    assert project_for_labelstudio(s, 41) == birds.id
    assert project_for_labelstudio(s, 41, title="QF review", settings=settings) == birds.id
    # no project recorded it: birds' by title; the default project's while it has recorded none
    assert project_for_labelstudio(s, 77, title="QF review · birds", settings=settings) == birds.id
    assert project_for_labelstudio(s, 77) == DEFAULT_PROJECT_ID
    assert project_for_labelstudio(s, None) == DEFAULT_PROJECT_ID
    default.labelstudio_project_id = 40
    s.flush()
    assert project_for_labelstudio(s, 40) == DEFAULT_PROJECT_ID
    assert project_for_labelstudio(s, 77, title="QF review", settings=settings) == 1
    with pytest.raises(NotFound, match="Label Studio project 77"):
        project_for_labelstudio(s, 77)
    with pytest.raises(NotFound):
        project_for_labelstudio(s, 77, title="someone else's", settings=settings)


def test_project_classes_and_the_demo_seed_belong_to_a_project(db_session, tmp_path):
    s, storage = db_session, LocalStorage(tmp_path / "store")
    storage.prepare()
    birds = create_project(session=s, name="birds", classes=["robin", "wren"]).id
    lab = create_project(session=s, name="lab", classes=DIGITS).id
    assert project_classes(session=s, project_id=birds) == ["robin", "wren"]
    first = seed_demo(session=s, storage=storage, limit=20)
    # the default project of an installation without a model: its seed snapshot's classes
    assert s.get(Project, DEFAULT_PROJECT_ID).classes == []
    assert project_classes(session=s) == DEMO_CLASSES
    again = seed_demo(session=s, storage=storage, limit=20, project_id=lab)
    assert (again.images_created, again.blobs_written, again.annotations_created) == (20, 0, 20)
    assert again.snapshot_created and again.snapshot_id != first.snapshot_id
    assert again.class_counts == first.class_counts
    twenty = sorted(probe_image(p).sha256 for p in demo_pngs(20)[0])
    for project_id in (DEFAULT_PROJECT_ID, lab):
        shas = s.scalars(select(Image.sha256).where(Image.project_id == project_id)).all()
        assert sorted(shas) == twenty
    repeat = seed_demo(session=s, storage=storage, limit=20, project_id=lab)
    assert (repeat.images_created, repeat.annotations_created) == (0, 0)
    assert (repeat.snapshot_id, repeat.snapshot_created) == (again.snapshot_id, False)
    assert s.scalar(select(Image.id).where(Image.project_id == birds)) is None


def test_the_cli_works_in_the_project_it_is_given(fresh_db_url, tmp_path, monkeypatch):
    migrations.upgrade(fresh_db_url)
    monkeypatch.setenv("QF_DATABASE_URL", fresh_db_url)
    monkeypatch.setenv("QF_STORAGE_URL", f"file://{tmp_path}/store")
    get_settings.cache_clear()
    engine = make_engine(fresh_db_url)
    with Session(engine, expire_on_commit=False) as s:
        lab = create_project(session=s, name="lab", classes=DIGITS).id
        mine = _queue(s, DEFAULT_PROJECT_ID, range(3))
        theirs = _queue(s, lab, range(2))
        s.commit()
    run = CliRunner().invoke
    for args, items in (([], mine), (["--project", "lab"], theirs)):
        out = run(cli.app, [*args, "review", "next", "--strategy", "uncertainty", "--json"])
        assert out.exit_code == 0, out.output
        listed = json.loads(out.output)
        assert listed["total"] == len(items)
        assert [i["id"] for i in listed["items"]] == [i.id for i in items]
    refused = run(cli.app, ["--project", "nope", "review", "next"])
    assert isinstance(refused.exception, NotFound)  # app.cli.main makes it exit code 2
    assert "no project 'nope'" in str(refused.exception)

    # the demo seed goes into lab: its two digits already there are known, the rest are new
    seeded = run(cli.app, ["--project", "lab", "seed-demo", "--limit", "10"])
    assert seeded.exit_code == 0, seeded.output
    assert "images: 10 (8 new, 8 blobs written)" in " ".join(seeded.output.split())
    with Session(engine) as s:
        count = select(Image.project_id, func.count()).group_by(Image.project_id)
        assert dict(s.execute(count).tuples().all()) == {DEFAULT_PROJECT_ID: 3, lab: 10}
        assert project_classes(session=s, project_id=lab) == DIGITS
    engine.dispose()


# --------------------------------------------------------------------------- Label Studio


@pytest.fixture(scope="module")
def studio() -> LabelStudio:
    return studio_client()


def test_a_second_project_syncs_with_its_own_label_studio_project(db_session, tmp_path, studio):
    s = db_session
    title = f"qf-pq-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        storage_url=f"file://{tmp_path}/store",
        labelstudio_url=LS_URL,
        labelstudio_token=LS_TOKEN,
        labelstudio_project=title,
        public_api_url="http://testserver",
    )
    birds = create_project(session=s, name="birds", classes=DIGITS)
    s.get(Project, DEFAULT_PROJECT_ID).classes = DIGITS  # as when it has had a model
    mine = _queue(s, DEFAULT_PROJECT_ID, range(3))
    theirs = _queue(s, birds.id, range(2))  # the same two digits, in birds
    s.commit()
    made = []
    try:
        got = sync_from_settings(session=s, settings=settings, project_id=birds.id)
        made.append(got["project_id"])
        assert got["push"] == {"pushed": 2, "recovered": 0} and got["pull"]["created"] == 0
        assert studio.client.projects.get(id=got["project_id"]).title == f"{title} · birds"
        s.expire_all()
        assert s.get(Project, birds.id).labelstudio_project_id == got["project_id"]
        assert s.get(Project, DEFAULT_PROJECT_ID).labelstudio_project_id is None
        ls_birds = LsProject(got["project_id"], f"{title} · birds", DIGITS)
        tasks = studio.existing_tasks(ls_birds)
        assert set(tasks) == set(SHAS[:2])
        assert {s.get(ReviewItem, i.id).external_task_id for i in theirs} == {
            str(t) for t in tasks.values()
        }
        assert {s.get(ReviewItem, i.id).state for i in mine} == {ReviewState.OPEN}

        ours = sync_from_settings(session=s, settings=settings)
        made.append(ours["project_id"])
        assert ours["project_id"] != got["project_id"]
        assert ours["push"] == {"pushed": 3, "recovered": 0}
        assert studio.client.projects.get(id=ours["project_id"]).title == title
        assert s.get(Project, DEFAULT_PROJECT_ID).labelstudio_project_id == ours["project_id"]
        assert set(studio.existing_tasks(LsProject(ours["project_id"], title, DIGITS))) == set(
            SHAS[:3]
        )
        assert project_for_labelstudio(s, got["project_id"]) == birds.id
        assert project_for_labelstudio(s, ours["project_id"]) == DEFAULT_PROJECT_ID

        # an annotator labels birds' digit 0: it lands on birds' image, not on its twin
        studio.annotate(tasks[SHAS[0]], TRUTH[0])
        pulled = sync_from_settings(session=s, settings=settings, project_id=birds.id)
        assert pulled["push"] == {"pushed": 0, "recovered": 0}
        assert pulled["pull"]["created"] == 1 and pulled["pull"]["resolved"] == 1
        s.expire_all()
        assert s.get(ReviewItem, theirs[0].id).resolved_label == TRUTH[0]
        assert s.get(ReviewItem, mine[0].id).state == ReviewState.SENT
        assert sync_from_settings(session=s, settings=settings)["pull"]["created"] == 0
    finally:
        for ls_id in made:
            studio.client.projects.delete(id=ls_id)


def test_webhooks_are_per_label_studio_project(studio):
    one = studio.ensure_project(f"qf-hook-a-{uuid.uuid4().hex[:8]}", DIGITS)
    two = studio.ensure_project(f"qf-hook-b-{uuid.uuid4().hex[:8]}", DIGITS)
    url = f"http://127.0.0.1:9/{uuid.uuid4().hex}/api/v1/labelstudio/webhook"
    try:
        first = studio.add_webhook(one, url, "secret")
        second = studio.add_webhook(two, url, "secret")  # the same address, another project
        assert first != second
        assert studio.add_webhook(one, url, "secret") == first  # not twice
        assert studio.add_webhook(two, url, "secret") == second
    finally:
        for project in (one, two):
            studio.client.projects.delete(id=project.id)

"""Label Studio 1.23.2 round trip against the real server `make test` starts: project from the
class list, review items pushed as tasks with pre-annotations (never twice), annotations made
through its API as an annotator's click would, pulled back, agreement and disputes, the
webhook, an outage, and images read from the GCS emulator."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.labelstudio import LS_TOKEN, LS_URL, studio_client
from helpers.serving import TcpProxy, ThreadedServer, deploy, local_deploy, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core import review
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.labelstudio import LabelStudio, LabelStudioUnavailable
from quarkflow_core.schema import Annotation, Image, ReviewItem, ReviewState

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def studio() -> LabelStudio:
    return studio_client()


def _queue(client, dep, n: int = 3) -> list[dict]:
    """n predictions that all go to the review queue (threshold 0.999)."""
    pngs, labels = demo_pngs(n)
    out = []
    for i in range(n):
        r = client.post(
            "/api/v1/predictions",
            files={"file": (f"{i}.png", pngs[i], "image/png")},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 200 and r.json()["review"] is True
        out.append({**r.json(), "truth": labels[i], "png": pngs[i]})
    wait_until(lambda: app_depth(client) == 0, what="the outbox to flush")
    return out


def app_depth(client) -> int:
    return client.get("/readyz").json()["checks"]["outbox"]["depth"]


def _items(engine) -> dict[str, ReviewItem]:
    with Session(engine) as s:
        rows = s.execute(select(ReviewItem, Image.sha256).join(Image)).all()
        return {sha: item for item, sha in rows}


def test_round_trip_agreement_and_disputes(tmp_path, trained_artifacts, studio):
    dep = local_deploy(tmp_path, trained_artifacts["strong"])
    settings = dep.settings(review_threshold=0.999, public_api_url="http://testserver")
    app = create_app(settings, with_demo=False)
    engine = dep.engine()
    with TestClient(app) as client:
        a, b, c = _queue(client, dep)
        classes = [str(d) for d in range(10)]
        other = next(x for x in classes if x not in (a["label"], a["truth"]))
        title = f"qf-test-{uuid.uuid4().hex[:8]}"
        project = studio.ensure_project(title, classes)
        assert studio.ensure_project(title, classes).id == project.id  # found, not duplicated
        url_of = review.image_url_builder(settings)
        with Session(engine) as s:
            first = review.push_review_items(
                session=s, studio=studio, project=project, image_url=url_of
            )
            again = review.push_review_items(
                session=s, studio=studio, project=project, image_url=url_of
            )
        assert first == {"pushed": 3, "recovered": 0} and again == {"pushed": 0, "recovered": 0}
        items = _items(engine)
        assert all(i.state == ReviewState.SENT and i.external_task_id for i in items.values())
        tasks = {sha: int(i.external_task_id) for sha, i in items.items()}
        assert studio.existing_tasks(project) == tasks
        # a crash after creating a task but before recording it: the next push recovers it
        with Session(engine) as s:
            item = s.get(ReviewItem, items[b["image_sha256"]].id)
            item.external_task_id, item.state = None, ReviewState.OPEN
            s.commit()
            assert review.push_review_items(
                session=s, studio=studio, project=project, image_url=url_of
            ) == {"pushed": 0, "recovered": 1}
        # the pre-annotation carries the model's label and score
        preds = studio.client.predictions.list(task=tasks[b["image_sha256"]])
        assert preds[0].result[0]["value"]["choices"] == [b["label"]]
        assert abs(preds[0].score - b["confidence"]) < 1e-6
        # the task's image link serves the real image (what the annotator's browser loads)
        task = studio.client.tasks.get(id=str(tasks[b["image_sha256"]]))
        link = urlsplit(task.data["image"])
        got = client.get(f"{link.path}?{link.query}")
        assert got.status_code == 200 and got.content == b["png"]
        forged = client.get(f"{link.path}?{link.query[:-4]}beef")
        assert forged.status_code == 403 and forged.json()["error"] == "bad_signature"

        # while A is with the annotators, an expert says it is `other`: that settles A for now
        # (one person, no disagreement yet) ...
        r = client.post(
            f"/api/v1/predictions/{a['id']}/feedback",
            json={"verdict": "wrong", "true_label": other},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 201
        wait_until(lambda: app_depth(client) == 0, what="feedback flushed")
        assert _items(engine)[a["image_sha256"]].state == ReviewState.RESOLVED
        # ... until the annotators say its true label: people disagree -> disputed
        # annotators: A <- its truth (disagrees with the expert); B <- truth twice (agree);
        # C <- two different labels (a tie)
        studio.annotate(tasks[a["image_sha256"]], a["truth"])
        studio.annotate(tasks[b["image_sha256"]], b["truth"])
        studio.annotate(tasks[b["image_sha256"]], b["truth"])
        c_other = next(x for x in classes if x != c["truth"])
        studio.annotate(tasks[c["image_sha256"]], c["truth"])
        studio.annotate(tasks[c["image_sha256"]], c_other)
        with Session(engine) as s:
            pulled = review.record_annotations(session=s, pulled=studio.annotations(project))
            s.commit()
            repeat = review.record_annotations(session=s, pulled=studio.annotations(project))
            s.commit()
        assert pulled["created"] == 5 and pulled["disputed"] == 2 and pulled["resolved"] == 1
        assert repeat["created"] == 0 and repeat["updated"] == 0
        items = _items(engine)
        assert items[a["image_sha256"]].state == ReviewState.DISPUTED
        assert items[b["image_sha256"]].state == ReviewState.RESOLVED
        assert items[b["image_sha256"]].resolved_label == b["truth"]
        assert items[c["image_sha256"]].state == ReviewState.DISPUTED

        # the disputed items stay in the queue until an analyst resolves one
        queue = client.get("/api/v1/review-queue", headers=dep.auth("analyst")).json()
        assert {i["state"] for i in queue["items"]} == {"disputed"}
        denied = client.post(
            f"/api/v1/review-queue/{items[a['image_sha256']].id}/resolve",
            json={"label": a["truth"]},
            headers=dep.auth("expert"),
        )
        assert denied.status_code == 403
        ok = client.post(
            f"/api/v1/review-queue/{items[a['image_sha256']].id}/resolve",
            json={"label": a["truth"]},
            headers=dep.auth("analyst"),
        )
        assert ok.status_code == 200 and ok.json()["state"] == "resolved"

    # accepted labels become training data; the tie (C) stays out
    from quarkflow_core.demo_data import seed_demo
    from quarkflow_core.labels import resolve_labels

    with Session(engine) as s:
        seed_demo(session=s, storage=dep.storage(), limit=20)
        s.commit()
        res = resolve_labels(session=s)
        ids = dict(s.execute(select(Image.sha256, Image.id)).tuples().all())
    assert res.labels[ids[a["image_sha256"]]] == a["truth"]
    assert res.source[ids[b["image_sha256"]]] == "review"
    assert ids[c["image_sha256"]] in res.unresolved
    engine.dispose()


def test_webhook_records_annotations_and_checks_its_secret(tmp_path, trained_artifacts, studio):
    dep = local_deploy(tmp_path, trained_artifacts["strong"])
    settings = dep.settings(review_threshold=0.999)
    app = create_app(settings, with_demo=False)
    engine = dep.engine()
    with ThreadedServer(app) as live:
        client = httpx.Client(base_url=live.url)
        (a,) = _queue(client, dep, n=1)
        project = studio.ensure_project(
            f"qf-hook-{uuid.uuid4().hex[:8]}", [str(d) for d in range(10)]
        )
        with Session(engine) as s:
            review.push_review_items(
                session=s,
                studio=studio,
                project=project,
                image_url=review.image_url_builder(
                    settings.model_copy(update={"public_api_url": live.url})
                ),
            )
        task_id = int(_items(engine)[a["image_sha256"]].external_task_id)
        bad = client.post(
            "/api/v1/labelstudio/webhook",
            json={"action": "ANNOTATION_CREATED"},
            headers={"X-Quarkflow-Webhook-Secret": "nope"},
        )
        assert bad.status_code == 401
        studio.add_webhook(
            project, f"{live.url}/api/v1/labelstudio/webhook", review.webhook_secret(settings)
        )
        studio.annotate(task_id, a["truth"])

        def arrived() -> bool:
            with Session(engine) as s:
                return (
                    s.scalar(select(Annotation).where(Annotation.external_task_id == str(task_id)))
                    is not None
                )

        wait_until(arrived, timeout=30, what="the webhook's annotation")
        assert _items(engine)[a["image_sha256"]].state == ReviewState.RESOLVED
    engine.dispose()


def test_label_studio_down_loses_and_duplicates_nothing(tmp_path, trained_artifacts, studio):
    dep = local_deploy(tmp_path, trained_artifacts["strong"])
    settings = dep.settings(review_threshold=0.999, public_api_url="http://testserver")
    app = create_app(settings, with_demo=False)
    engine = dep.engine()
    ls = urlsplit(LS_URL)
    proxy = TcpProxy(ls.hostname, ls.port)
    waits: list[float] = []
    flaky = LabelStudio(f"http://127.0.0.1:{proxy.port}", LS_TOKEN, attempts=3, sleep=waits.append)
    with TestClient(app) as client:
        items = _queue(client, dep, n=2)
    project = studio.ensure_project(f"qf-down-{uuid.uuid4().hex[:8]}", [str(d) for d in range(10)])
    url_of = review.image_url_builder(settings)
    try:
        proxy.down()
        with Session(engine) as s, pytest.raises(LabelStudioUnavailable, match="unreachable"):
            review.push_review_items(session=s, studio=flaky, project=project, image_url=url_of)
        assert waits == [0.5, 1.0]  # exponential backoff between the attempts
        assert all(
            i.state == ReviewState.OPEN and i.external_task_id is None
            for i in _items(engine).values()
        )
        proxy.up()
        with Session(engine) as s:
            assert review.push_review_items(
                session=s, studio=flaky, project=project, image_url=url_of
            ) == {"pushed": 2, "recovered": 0}
        assert len(studio.existing_tasks(project)) == 2
        assert {i["image_sha256"] for i in items} == set(studio.existing_tasks(project))
    finally:
        proxy.down()
        engine.dispose()


def test_sync_with_images_read_from_the_gcs_emulator(
    fresh_db_url, tmp_path, trained_artifacts, studio, gcs_host
):
    """Storage is gs://: tasks carry gs:// URLs and Label Studio reads the images through its
    GCS import storage from fake-gcs-server (STORAGE_EMULATOR_HOST in its environment)."""
    from helpers.storage import make_gcs

    bucket = make_gcs(gcs_host).bucket_name
    dep = deploy(
        fresh_db_url,
        f"gs://{bucket}/qf",
        tmp_path / "qf",
        trained_artifacts["strong"],
        emulator_host=gcs_host,
    )
    settings = dep.settings(
        review_threshold=0.999,
        labelstudio_url=LS_URL,
        labelstudio_token=LS_TOKEN,
        labelstudio_project=f"qf-gcs-{uuid.uuid4().hex[:8]}",
    )
    app = create_app(settings, with_demo=False)
    engine = dep.engine()
    with TestClient(app) as client:
        a, b = _queue(client, dep, n=2)
    with Session(engine) as s:
        first = review.sync_from_settings(session=s, settings=settings)
    assert first["push"] == {"pushed": 2, "recovered": 0} and first["pull"]["created"] == 0
    project = studio.ensure_project(settings.labelstudio_project, [str(d) for d in range(10)])
    tasks = studio.existing_tasks(project)
    headers = {"Authorization": f"Token {LS_TOKEN}"}
    for item in (a, b):
        task = httpx.get(
            f"{LS_URL}/api/tasks/{tasks[item['image_sha256']]}",
            params={"resolve_uri": "true"},
            headers=headers,
        ).json()
        served = httpx.get(LS_URL + task["data"]["image"], headers=headers)
        assert served.status_code == 200 and served.content == item["png"]  # via the emulator
    studio.annotate(tasks[a["image_sha256"]], a["truth"])
    with Session(engine) as s:
        second = review.sync_from_settings(session=s, settings=settings)
    assert second["push"] == {"pushed": 0, "recovered": 0}
    assert second["pull"]["created"] == 1 and second["pull"]["resolved"] == 1
    assert _items(engine)[a["image_sha256"]].resolved_label == a["truth"]
    engine.dispose()


def test_labelstudio_sync_flow(prefect_harness, monkeypatch, tmp_path, trained_artifacts, studio):
    from flows.labelstudio_sync import labelstudio_sync
    from quarkflow_core.config import get_settings

    db_url, store_url = f"sqlite:///{tmp_path}/qf.db", f"file://{tmp_path}/store"
    dep = deploy(db_url, store_url, tmp_path / "qf", trained_artifacts["strong"])
    title = f"qf-flow-{uuid.uuid4().hex[:8]}"
    for key, value in {
        "QF_DATABASE_URL": db_url,
        "QF_STORAGE_URL": store_url,
        "QF_LABELSTUDIO_URL": LS_URL,
        "QF_LABELSTUDIO_TOKEN": LS_TOKEN,
        "QF_LABELSTUDIO_PROJECT": title,
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    app = create_app(dep.settings(review_threshold=0.999), with_demo=False)
    with TestClient(app) as client:
        (a,) = _queue(client, dep, n=1)
    result = labelstudio_sync()
    assert result["push"] == {"pushed": 1, "recovered": 0}
    project = studio.ensure_project(title, [str(d) for d in range(10)])
    assert set(studio.existing_tasks(project)) == {a["image_sha256"]}
    assert labelstudio_sync()["push"] == {"pushed": 0, "recovered": 0}  # nothing twice

"""The review queue means "work to do" (issue 15): answers settle items and they never come
back; the open items follow the current champion (re-scored when it changes, closed when it is
sure); batch-mode selection spreads a batch out. Real models, real API, real database."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.serving import local_deploy, seed_and_register, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app import cli
from app.api import create_app
from quarkflow_core import registry
from quarkflow_core.config import get_settings
from quarkflow_core.demo_data import demo_traffic_pngs
from quarkflow_core.images import validate_upload
from quarkflow_core.predictor import Predictor, summarize
from quarkflow_core.queue import diverse_order, probability_vector, uncertainty
from quarkflow_core.schema import Image, ReviewItem, ReviewReason, ReviewState, User

pytestmark = pytest.mark.integration


@functools.cache
def _traffic(n: int = 40) -> tuple[list[bytes], list[str]]:
    return demo_traffic_pngs(n)  # unseen by the models, a quarter hard on purpose


def _predict_all(client, dep, pngs) -> list[dict]:
    out = []
    for i in range(0, len(pngs), 8):
        r = client.post(
            "/api/v1/predictions/batch",
            files=[("files", (f"{j}.png", d, "image/png")) for j, d in enumerate(pngs[i : i + 8])],
            headers=dep.auth("expert"),
        )
        assert r.status_code == 200, r.text
        out += r.json()["predictions"]
    return out


def _logged(client, dep, ids) -> bool:
    return all(
        client.get(f"/api/v1/predictions/{i}", headers=dep.auth("expert")).json()["logged"]
        for i in ids
    )


def _whole_queue(client, dep, *, page: int = 7, strategy: str = "uncertainty") -> list[dict]:
    items, offset = [], 0
    while True:
        r = client.get(
            "/api/v1/review-queue",
            params={"limit": page, "offset": offset, "strategy": strategy},
            headers=dep.auth("analyst"),
        )
        assert r.status_code == 200, r.text
        got = r.json()["items"]
        items += got
        if len(got) < page:
            return items
        offset += page


def test_answered_items_leave_the_queue_and_never_come_back(tmp_path, trained_artifacts):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    pngs, truth = _traffic()
    app = create_app(dep.settings(review_threshold=0.999), with_demo=False)
    with TestClient(app) as client:
        preds = _predict_all(client, dep, pngs)
        assert all(p["review"] for p in preds)  # threshold 0.999: everything is work
        wait_until(lambda: _logged(client, dep, [p["id"] for p in preds]), what="the outbox")
        assert len(_whole_queue(client, dep)) == 40
        # an expert answers 12 of them, as the demo's buttons do; one more is "wrong" with no label
        answered = {}
        for p, label in list(zip(preds, truth, strict=True))[:12]:
            body = (
                {"verdict": "correct"}
                if p["label"] == label
                else {"verdict": "wrong", "true_label": label}
            )
            r = client.post(
                f"/api/v1/predictions/{p['id']}/feedback", json=body, headers=dep.auth("expert")
            )
            assert r.status_code == 201, r.text
            answered[p["image_sha256"]] = label
        unlabelled = preds[12]
        r = client.post(
            f"/api/v1/predictions/{unlabelled['id']}/feedback",
            json={"verdict": "wrong"},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 201
        wait_until(
            lambda: len(_whole_queue(client, dep)) == 28, what="answered items leaving the queue"
        )
        # the same images scored again (the model still unsure of all of them): nothing answered
        # comes back, across every page of the queue
        again = _predict_all(client, dep, pngs)
        wait_until(lambda: _logged(client, dep, [p["id"] for p in again]), what="the outbox")
        queue = _whole_queue(client, dep)
        shas = [i["image_sha256"] for i in queue]
        assert len(queue) == 28 and len(set(shas)) == 28
        assert not set(shas) & set(answered)
        # paging through the diverse order also gives every item exactly once
        spread = [i["image_sha256"] for i in _whole_queue(client, dep, strategy="diverse")]
        assert len(spread) == 28 and set(spread) == set(shas)
        # "wrong" without a label is still work (someone must say what it is), and comes first
        assert queue[0]["image_sha256"] == unlabelled["image_sha256"]
        assert queue[0]["reason"] == "user_disputed" and queue[0]["priority"] >= 1
        # every unanswered item now carries the latest prediction
        latest = {p["image_sha256"]: p["id"] for p in again}
        assert all(i["prediction_id"] == latest[i["image_sha256"]] for i in queue[1:])
    engine = dep.engine()
    with Session(engine) as s:
        settled = dict(
            s.execute(
                select(Image.sha256, ReviewItem.resolved_label)
                .join(Image, Image.id == ReviewItem.image_id)
                .where(ReviewItem.state == ReviewState.RESOLVED)
            ).all()
        )
    engine.dispose()
    assert settled == answered  # settled with what the expert said, confirmed or corrected


def test_a_new_champion_rescores_the_queue_and_closes_what_it_is_sure_of(
    tmp_path, trained_artifacts, monkeypatch
):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    strong = seed_and_register(dep, trained_artifacts["strong"], as_challenger=False)
    pngs, _ = _traffic()
    threshold = 0.9
    app = create_app(dep.settings(review_threshold=threshold, model_poll_s=0.1), with_demo=False)
    engine = dep.engine()
    with TestClient(app) as client:
        preds = _predict_all(client, dep, pngs)
        wait_until(lambda: _logged(client, dep, [p["id"] for p in preds]), what="the outbox")
        queued = {p["image_sha256"] for p in preds if p["review"]}
        assert len(queued) >= 20  # the weak v1 is unsure of most of them
        assert {i["image_sha256"] for i in _whole_queue(client, dep)} == queued
        with Session(engine, expire_on_commit=False) as s:
            lead = s.scalar(select(User).where(User.username == "lead"))
            registry.approve(
                session=s,
                storage=dep.storage(),
                version=strong,
                user=lead,
                reason="stronger model: the queue must follow it",
                cache_root=tmp_path / "lead",
                override=True,
            )

        def rescored() -> bool:
            with Session(engine) as s:
                return all(
                    v == 2
                    for v in s.scalars(
                        select(ReviewItem.scored_version).where(
                            ReviewItem.reason == ReviewReason.LOW_CONFIDENCE
                        )
                    )
                )

        wait_until(rescored, timeout=60, what="the API re-scoring the queue with v2")
        queue = _whole_queue(client, dep, page=50)
        diverse = client.get(
            "/api/v1/review-queue",
            params={"limit": 5, "strategy": "diverse"},
            headers=dep.auth("analyst"),
        ).json()["items"]
    # what v2 itself says about each queued image, computed here independently
    v2 = Predictor.from_artifact(trained_artifacts["strong"], version=2)
    by_sha = {hashlib.sha256(d).hexdigest(): d for d in pngs}
    expected = {}
    for sha in queued:
        probs = v2.probabilities(v2.preprocess_image(validate_upload(by_sha[sha])[1])[None])[0]
        s = summarize(probs, v2.classes, k=5)
        expected[sha] = (s["confidence"], uncertainty(margin=s["margin"], entropy=s["entropy"]))
    still_unsure = [sha for sha in queued if expected[sha][0] < threshold]
    sure = set(queued) - set(still_unsure)
    assert sure and still_unsure  # v2 settles some doubts of v1 but not all
    order = [i["image_sha256"] for i in queue]
    assert set(order) == set(still_unsure)  # the ones v2 is sure of left the queue
    assert all(i["scored_by"] == 2 for i in queue)
    # the queue's order is v2's uncertainty order: each priority is v2's own uncertainty
    # about the image (to 1e-3: the API serves the ONNX export, this is the eager model)
    got = [i["priority"] for i in queue]
    assert got == sorted(got, reverse=True)
    assert [expected[s][1] for s in order] == pytest.approx(got, abs=1e-3)
    with Session(engine) as s:
        closed = s.execute(
            select(Image.sha256, ReviewItem.note)
            .join(Image, Image.id == ReviewItem.image_id)
            .where(ReviewItem.state == ReviewState.CLOSED)
        ).all()
    assert {sha for sha, _ in closed} == sure
    assert all(note.startswith("v2 is now confident") for _, note in closed)
    # the diverse batch starts with the most uncertain and spreads over predicted labels
    assert diverse[0]["image_sha256"] == order[0]
    labels_in_queue = {i["predicted_label"] for i in queue}
    assert len({i["predicted_label"] for i in diverse}) == min(5, len(labels_in_queue))
    # the CLI lists the same next items
    for key, value in dep.env().items():
        if key.startswith("QF_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    out = CliRunner().invoke(cli.app, ["review", "next", "--strategy", "uncertainty", "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert [i["image_sha256"] for i in listed["items"]] == order[:20]
    engine.dispose()


def test_diverse_order_balances_classes_and_skips_near_duplicates():
    classes = [str(c) for c in range(10)]
    # ten near-identical "4 or 9" cases, most uncertain of all, then a few others
    vectors, labels, prio = [], [], []
    for k in range(10):
        vectors.append(
            probability_vector(
                [{"label": "4", "confidence": 0.5 + k * 1e-3}, {"label": "9", "confidence": 0.49}],
                classes,
            )
        )
        labels.append("4")
        prio.append(0.9 - k * 1e-4)
    for label, other in (("3", "5"), ("7", "1"), ("2", "8"), ("4", "1")):
        vectors.append(
            probability_vector(
                [{"label": label, "confidence": 0.6}, {"label": other, "confidence": 0.3}],
                classes,
            )
        )
        labels.append(label)
        prio.append(0.7)
    picked = diverse_order(prio, labels, np.stack(vectors), 5)
    # the most uncertain first, one per predicted class, then the "4" unlike the duplicates
    assert picked == [0, 10, 11, 12, 13]
    by_uncertainty = sorted(range(len(prio)), key=lambda i: -prio[i])[:5]
    assert by_uncertainty == [0, 1, 2, 3, 4]  # what top-k alone would have asked: duplicates
    assert diverse_order(prio, labels, np.stack(vectors), 0) == []

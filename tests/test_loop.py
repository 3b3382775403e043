"""The product's promise, end to end on real digits: a small seed set -> champion v1; unseen
images predicted through the API; experts answer the review queue with the true labels;
`retrain` registers a challenger; an ML lead approves it through the API; the API serves v2,
which is better on the hold-out (the seed's, grown by a share of the experts' answers). And the
negative case: a deliberately undertrained candidate is flagged by the policy."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from helpers.serving import deploy, wait_until
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core.config import get_settings
from quarkflow_core.demo_data import demo_pngs, seed_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SEED, STREAM = 500, 1000  # 400 train + 100 hold-out seed digits; 1,000 unseen digits
SPEC = {"epochs": 6, "batch_size": 64, "augment": "none", "export": "onnx"}


def test_feedback_loop_improves_the_served_model(
    prefect_harness, monkeypatch, tmp_path, pg_factory
):
    from flows.retrain import retrain

    db_url, store_url = pg_factory.create(), f"file://{tmp_path}/store"
    monkeypatch.setenv("QF_DATABASE_URL", db_url)
    monkeypatch.setenv("QF_STORAGE_URL", store_url)
    get_settings.cache_clear()
    pngs, labels = demo_pngs(SEED + STREAM)
    truth = {hashlib.sha256(p).hexdigest(): lab for p, lab in zip(pngs, labels, strict=True)}

    # v1: trained by the retrain flow on the seed set alone, approved as the first champion
    dep = deploy(db_url, store_url, tmp_path / "qf", champion=None)  # users + tokens
    engine = dep.engine()
    with Session(engine) as s:
        seed_demo(session=s, storage=dep.storage(), limit=SEED)
        s.commit()
    first = retrain(**SPEC)["candidate"]
    assert first["version"] == 1 and first["policy"]["verdict"] == "no_champion"

    app = create_app(dep.settings(review_threshold=0.995, model_poll_s=0.2), with_demo=False)
    with TestClient(app) as client:
        ok = client.post(
            "/api/v1/models/1/approve", json={"reason": "first model"}, headers=dep.auth("lead")
        )
        assert ok.status_code == 200, ok.text
        wait_until(
            lambda: client.get("/readyz").json()["checks"]["model"].get("version") == 1,
            what="v1 served",
        )
        # domain experts send unseen digits, 8 per request
        for start in range(SEED, SEED + STREAM, 8):
            files = [("files", (f"{i}.png", pngs[i], "image/png")) for i in range(start, start + 8)]
            r = client.post("/api/v1/predictions/batch", files=files, headers=dep.auth("expert"))
            assert r.status_code == 200, r.text
        wait_until(
            lambda: client.get("/readyz").json()["checks"]["outbox"]["depth"] == 0,
            what="the outbox to flush",
        )
        # experts answer the review queue with the true labels
        queue = client.get(
            "/api/v1/review-queue", params={"limit": 500}, headers=dep.auth("analyst")
        ).json()
        assert queue["total"] >= 100
        # the whole queue first (answered items leave it, so paging while answering would skip)
        items, offset = [], 0
        while page := client.get(
            "/api/v1/review-queue",
            params={"limit": 200, "offset": offset},
            headers=dep.auth("analyst"),
        ).json()["items"]:
            items += page
            offset += len(page)
        assert len(items) == queue["total"]
        answered = 0
        for item in items:
            label = truth[item["image_sha256"]]
            verdict = "correct" if item["predicted_label"] == label else "wrong"
            fb = client.post(
                f"/api/v1/predictions/{item['prediction_id']}/feedback",
                json={"verdict": verdict, "true_label": label},
                headers=dep.auth("expert"),
            )
            assert fb.status_code == 201, fb.text
            answered += 1
        wait_until(
            lambda: client.get("/readyz").json()["checks"]["outbox"]["depth"] == 0,
            what="the feedback to flush",
        )

        # retrain on seed + feedback; the challenger is judged against v1 on the same hold-out
        result = retrain(**SPEC)
        cand, snap = result["candidate"], result["snapshot"]
        settled = sum(n for src, n in snap["sources"].items() if src != "seed")
        assert settled + sum(snap["holdout_sources"].values()) == answered
        # the hold-out grew by 20% of the answers, per class (rounded), never from trained images
        assert snap["holdout"] == 100 + snap["holdout_grown"]
        assert abs(snap["holdout_grown"] - 0.2 * answered) <= 5
        assert cand["version"] == 2 and cand["champion"] == 1
        assert cand["accuracy_candidate"] > cand["accuracy_champion"]
        print(
            f"loop: {answered} answers; hold-out accuracy v1 {cand['accuracy_champion']:.3f} -> "
            f"v2 {cand['accuracy_candidate']:.3f}; McNemar p {cand['mcnemar_p']:.2g}; "
            f"policy {cand['policy']['verdict']}"
        )
        body = {"reason": "retrained on the experts' answers; better on the hold-out"}
        if not cand["policy"]["passed"]:
            body["override"] = True
        approved = client.post("/api/v1/models/2/approve", json=body, headers=dep.auth("lead"))
        assert approved.status_code == 200, approved.text
        wait_until(
            lambda: client.get("/readyz").json()["checks"]["model"].get("version") == 2,
            what="the API to serve v2",
        )
        r = client.post(
            "/api/v1/predictions",
            files={"file": ("x.png", pngs[SEED], "image/png")},
            headers=dep.auth("expert"),
        )
        assert r.json()["model_version"] == 2

        # the negative case: an undertrained candidate is flagged, not promoted
        worse = retrain(**{**SPEC, "epochs": 1, "lr": 1e-5, "seed": 1})["candidate"]
        assert worse["policy"]["passed"] is False
        assert any(r.startswith("significantly worse") for r in worse["policy"]["reasons"])
        assert client.get("/readyz").json()["checks"]["model"]["version"] == 2
    engine.dispose()

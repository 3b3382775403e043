"""Property test (issue 16): arbitrary strings and headers through every write path of the API
on Postgres. Whatever is sent, the answer is never a 5xx; every 2xx record lands in the
database exactly as acknowledged; nothing ends in the outbox's dead letters."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from helpers.serving import ThreadedServer, deploy, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.schema import AuditLog, Feedback, Prediction, ReviewItem, User

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = [str(d) for d in range(10)]
# Any text: NUL and other control characters, lone combining marks, emoji, very long strings.
ANY_TEXT = st.text(max_size=300) | st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8)
# What an HTTP client can put in a header value (h11 refuses control characters and leading or
# trailing blanks itself): any Latin-1 text, sent as raw bytes.
HEADER = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=90,
).map(lambda v: v.strip(" \t"))
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_every_acknowledged_write_lands_whatever_the_input(pg_factory, tmp_path, trained_artifacts):
    dep = deploy(
        pg_factory.create(),
        f"file://{tmp_path}/store",
        tmp_path / "qf",
        trained_artifacts["strong"],
    )
    pngs, _ = demo_pngs(20)
    app = create_app(dep.settings(review_threshold=0.9999), with_demo=False)
    expert, analyst, lead, admin = (dep.auth(w) for w in ("expert", "analyst", "lead", "admin"))
    acked_predictions: dict[str, str | None] = {}
    acked_feedback: dict[str, tuple] = {}
    acked_users: dict[str, str] = {}
    server_errors: list[str] = []

    def check(r, what: str) -> bool:
        if r.status_code >= 500:
            server_errors.append(f"{what}: {r.status_code} {r.text[:200]}")
        return 200 <= r.status_code < 300

    # A real uvicorn server: the in-process TestClient re-encodes non-ASCII header values.
    with ThreadedServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:

        @FAST
        @given(request_id=HEADER, image=st.integers(0, len(pngs) - 1))
        def predictions(request_id: str, image: int) -> None:
            r = client.post(
                "/api/v1/predictions",
                files={"file": ("d.png", pngs[image], "image/png")},
                headers={**expert, "X-Request-Id": request_id.encode("latin-1")},
            )
            if check(r, f"prediction X-Request-Id={request_id!r}"):
                acked_predictions[r.json()["id"]] = request_id

        predictions()
        assert acked_predictions, "no prediction was acknowledged at all"
        ids = sorted(acked_predictions)

        @FAST
        @given(
            which=st.integers(0, len(ids) - 1),
            verdict=st.sampled_from(["correct", "wrong"]) | st.sampled_from(["wrong"]) | ANY_TEXT,
            true_label=st.none() | st.sampled_from(CLASSES) | st.sampled_from(CLASSES) | ANY_TEXT,
            comment=st.none() | ANY_TEXT | st.text(min_size=1990, max_size=2010),
        )
        def feedback(which: int, verdict: str, true_label, comment) -> None:
            body = {"verdict": verdict, "true_label": true_label, "comment": comment}
            r = client.post(f"/api/v1/predictions/{ids[which]}/feedback", json=body, headers=expert)
            if check(r, f"feedback {body!r}"):
                out = r.json()
                acked_feedback[out["id"]] = (ids[which], out["verdict"], out["true_label"], comment)

        feedback()
        wait_until(
            lambda: client.get("/api/v1/review-queue?limit=1", headers=analyst).json()["total"],
            what="review items",
        )
        items = client.get("/api/v1/review-queue?limit=200", headers=analyst).json()["items"]

        @FAST
        @given(
            which=st.integers(0, max(0, len(items) - 1)),
            label=st.sampled_from(CLASSES) | ANY_TEXT,
            dismiss=st.booleans(),
        )
        def review(which: int, label: str, dismiss: bool) -> None:
            item = items[which]["id"] if items else 1
            if dismiss:
                r = client.post(f"/api/v1/review-queue/{item}/dismiss", headers=analyst)
            else:
                r = client.post(
                    f"/api/v1/review-queue/{item}/resolve", json={"label": label}, headers=analyst
                )
            check(r, f"review {item} {'dismiss' if dismiss else label!r}")

        review()

        @FAST
        @given(reason=ANY_TEXT, ref=st.sampled_from(["challenger", "v1", "v9"]) | ANY_TEXT)
        def decisions(reason: str, ref: str) -> None:
            for path in (f"/api/v1/models/{quote(ref, safe='')}/reject", "/api/v1/models/rollback"):
                r = client.post(path, json={"reason": reason}, headers=lead)
                check(r, f"{path} reason={reason!r}")

        decisions()

        @FAST
        @given(
            username=st.from_regex(r"[A-Za-z0-9._@-]{2,64}", fullmatch=True) | ANY_TEXT,
            role=st.sampled_from(["domain_expert", "analyst"]) | ANY_TEXT,
            password=st.none() | ANY_TEXT,
        )
        def users(username: str, role: str, password) -> None:
            body = {"username": username, "role": role, "password": password}
            r = client.post("/api/v1/users", json=body, headers=admin)
            if check(r, f"user {body!r}"):
                acked_users[r.json()["username"]] = role

        users()
        service = app.state.service
        wait_until(lambda: service.outbox.depth() == 0, timeout=60, what="the outbox to drain")
        assert service.outbox.dead_letters() == 0
    assert not server_errors, server_errors[:5]

    engine = dep.engine()
    try:
        with Session(engine) as s:
            rows = {p.id: p for p in s.scalars(select(Prediction))}
            missing = set(acked_predictions) - set(rows)
            assert not missing, f"{len(missing)} of {len(acked_predictions)} predictions lost"
            for pid, request_id in acked_predictions.items():
                assert rows[pid].request_id == request_id
            fbs = {f.id: f for f in s.scalars(select(Feedback))}
            lost = set(acked_feedback) - set(fbs)
            assert not lost, f"{len(lost)} of {len(acked_feedback)} feedback records lost"
            for fid, (pid, verdict, label, comment) in acked_feedback.items():
                f = fbs[fid]
                assert (f.prediction_id, f.verdict.value, f.true_label, f.comment) == (
                    pid,
                    verdict,
                    label,
                    comment,
                )
            names = set(s.scalars(select(User.username)))
            assert set(acked_users) <= names
            assert s.scalar(select(ReviewItem.id).limit(1)) is not None
            assert s.scalars(select(AuditLog)).first() is not None
    finally:
        engine.dispose()
    print(
        f"acknowledged and found: {len(acked_predictions)} predictions, "
        f"{len(acked_feedback)} feedback, {len(acked_users)} users"
    )

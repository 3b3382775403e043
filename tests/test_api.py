"""The REST API and prediction service, in-process, on SQLite and Postgres, with a local
folder and fake-gcs-server as storage."""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.serving import deploy, local_deploy, seed_and_register, wait_until
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api import STATUS, create_app
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.schema import (
    AuditLog,
    Feedback,
    Image,
    Prediction,
    ReviewItem,
    ReviewState,
    User,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "gcs"])
def deployment(request, fresh_db_url, tmp_path, trained_artifacts, gcs_host):
    if request.param == "gcs":
        from helpers.storage import make_gcs

        bucket = make_gcs(gcs_host).bucket_name
        return deploy(
            fresh_db_url,
            f"gs://{bucket}/qf",
            tmp_path / "qf",
            trained_artifacts["strong"],
            emulator_host=gcs_host,
        )
    return deploy(
        fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", trained_artifacts["strong"]
    )


@functools.cache
def _demo20() -> tuple[list[bytes], list[str]]:
    return demo_pngs(20)


def _png(i: int = 0) -> tuple[bytes, str]:
    pngs, labels = _demo20()
    return pngs[i], labels[i]


def _counts(dep) -> tuple[int, int, int, int]:
    engine = dep.engine()
    try:
        with Session(engine) as s:
            return tuple(
                s.scalar(select(func.count()).select_from(t))
                for t in (Image, Prediction, Feedback, ReviewItem)
            )
    finally:
        engine.dispose()


def test_predict_feedback_review_round_trip(deployment):
    dep = deployment
    app = create_app(dep.settings(review_threshold=0.999), with_demo=False)
    data, truth = _png(0)
    with TestClient(app) as client:
        r = client.post(
            "/api/v1/predictions",
            files={"file": ("d.png", data, "image/png")},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == truth and body["model_version"] == 1
        assert abs(sum(t["confidence"] for t in body["topk"]) - 1) < 0.05
        assert body["topk"][0]["label"] == body["label"] and body["latency_ms"] > 0
        assert body["review"] is True  # threshold 0.999: everything goes to review
        pid = body["id"]
        logged = wait_until(
            lambda: client.get(f"/api/v1/predictions/{pid}", headers=dep.auth("expert")).json()[
                "logged"
            ],
            what="the outbox to flush",
        )
        assert logged
        fb = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            json={"verdict": "wrong", "true_label": "7", "comment": "looks like a 7"},
            headers=dep.auth("expert"),
        )
        assert fb.status_code == 201 and fb.json()["durable"] is True
        wait_until(lambda: _counts(dep)[2] == 1, what="feedback row")
        batch = client.post(
            "/api/v1/predictions/batch",
            files=[("files", (f"{i}.png", _png(i)[0], "image/png")) for i in range(1, 4)],
            headers=dep.auth("expert"),
        )
        assert batch.status_code == 200
        assert [p["label"] for p in batch.json()["predictions"]] == [_png(i)[1] for i in (1, 2, 3)]
        wait_until(lambda: _counts(dep)[1] == 4, what="four prediction rows")
        queue = client.get("/api/v1/review-queue", headers=dep.auth("analyst")).json()
        # "wrong, it is 7" answered the first image: it left the queue, settled with 7
        assert queue["total"] == 3 and pid not in {i["prediction_id"] for i in queue["items"]}
        assert all(i["priority"] < 1 and i["state"] == "open" for i in queue["items"])
        detail = client.get(f"/api/v1/predictions/{pid}", headers=dep.auth("analyst")).json()
        assert detail["feedback"][0]["true_label"] == "7"
        assert detail["review"] == {"state": "resolved", "reason": "low_confidence"}
        # a second answer that disagrees makes it disputed: back in the queue, first
        fb = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            json={"verdict": "wrong", "true_label": "1"},
            headers=dep.auth("expert"),
        )
        assert fb.status_code == 201
        wait_until(lambda: _counts(dep)[2] == 2, what="second feedback row")
        queue = client.get("/api/v1/review-queue", headers=dep.auth("analyst")).json()
        first = queue["items"][0]
        assert queue["total"] == 4 and first["prediction_id"] == pid
        assert first["state"] == "disputed" and first["expert_label"] == "1"
        assert [i["expert_label"] for i in queue["items"][1:]] == [None] * 3
        assert first["priority"] >= 1 > queue["items"][1]["priority"]
        metrics = client.get("/metrics").text
        assert 'qf_http_requests_total{method="POST",route="/api/v1/predictions",status="200"}' in (
            metrics
        )
        assert "qf_model_version 1.0" in metrics and "qf_outbox_depth 0.0" in metrics
    images, preds, feedback, reviews = _counts(dep)
    assert (images, preds, feedback, reviews) == (4, 4, 2, 4)
    storage = dep.storage()
    engine = dep.engine()
    with Session(engine) as s:
        keys = s.scalars(select(Image.storage_key)).all()
        item = s.scalar(select(ReviewItem).where(ReviewItem.prediction_id == pid))
        assert item.state == ReviewState.DISPUTED and item.resolved_label is None
        assert item.note == "people disagree: 1, 7"
    engine.dispose()
    assert all(storage.exists(k) for k in keys)
    assert storage.get(keys[0])[:4] == b"\x89PNG"


def test_feedback_errors_name_the_problem(deployment, tmp_path):
    dep = deployment
    app = create_app(dep.settings(), with_demo=False)
    with TestClient(app) as client:
        h = dep.auth("expert")
        pid = client.post(
            "/api/v1/predictions", files={"file": ("d.png", _png()[0], "image/png")}, headers=h
        ).json()["id"]
        cases = [
            ("no-such-id", {"verdict": "wrong"}, 404, "not_found"),
            (pid, {"verdict": "maybe"}, 422, "invalid_input"),
            (pid, {"verdict": "wrong", "true_label": "cat"}, 422, "unknown_label"),
            (
                pid,
                {"verdict": "correct", "true_label": "9" if _png()[1] != "9" else "8"},
                422,
                "invalid_input",
            ),
            (pid, {"true_label": "7"}, 422, "invalid_request"),
        ]
        for target, body, status, code in cases:
            r = client.post(f"/api/v1/predictions/{target}/feedback", json=body, headers=h)
            assert (r.status_code, r.json()["error"]) == (status, code), (body, r.text)
            assert r.json()["detail"]
        assert client.get("/api/v1/predictions/nope", headers=h).status_code == 404


# --------------------------------------------------------------------------- auth and roles


def test_roles_on_every_mutating_route(deployment, trained_artifacts):
    dep = deployment
    app = create_app(dep.settings(), with_demo=False)
    with TestClient(app) as client:
        img = {"file": ("d.png", _png()[0], "image/png")}
        assert client.post("/api/v1/predictions", files=img).status_code == 401
        bad = client.post("/api/v1/predictions", files=img, headers={"Authorization": "Bearer x"})
        assert (bad.status_code, bad.json()["error"]) == (401, "authentication_failed")
        assert (
            client.post(
                "/api/v1/predictions", files=img, headers={"Authorization": "Basic x"}
            ).status_code
            == 401
        )
        for who in ("expert", "analyst", "lead", "admin"):
            r = client.post("/api/v1/predictions", files=img, headers=dep.auth(who))
            assert r.status_code == 200, (who, r.text)
        pid = r.json()["id"]
        fb = client.post(f"/api/v1/predictions/{pid}/feedback", json={"verdict": "correct"})
        assert fb.status_code == 401
        assert client.get("/api/v1/review-queue", headers=dep.auth("expert")).status_code == 403
        assert client.get("/api/v1/review-queue", headers=dep.auth("analyst")).status_code == 200

        # register a candidate directly, then try to promote it with every role
        seed_and_register(dep, trained_artifacts["strong_b"])
        engine = dep.engine()
        decision = {"reason": "strong_b is as good as v1 on the hold-out", "override": True}
        for who in ("expert", "analyst"):
            for path, body in (
                ("/api/v1/models/2/approve", decision),
                ("/api/v1/models/2/reject", decision),
                ("/api/v1/models/rollback", {"reason": "x", "to": "1"}),
            ):
                r = client.post(path, json=body, headers=dep.auth(who))
                assert (r.status_code, r.json()["error"]) == (403, "permission_denied"), path
            r = client.post(
                "/api/v1/users", json={"username": "eve", "role": "admin"}, headers=dep.auth(who)
            )
            assert r.status_code == 403
        assert client.post("/api/v1/models/2/approve", json=decision).status_code == 401
        for path, body in (
            ("/api/v1/review-queue/1/resolve", {"label": "3"}),
            ("/api/v1/review-queue/1/dismiss", None),
            ("/api/v1/retrain", {"epochs": 1}),
        ):
            r = client.post(path, json=body, headers=dep.auth("expert"))
            assert (r.status_code, r.json()["error"]) == (403, "permission_denied"), path
            assert client.post(path, json=body).status_code == 401
        hook = client.post("/api/v1/labelstudio/webhook", json={"action": "ANNOTATION_CREATED"})
        assert (hook.status_code, hook.json()["error"]) == (401, "authentication_failed")
        with Session(engine) as s:
            denied = s.scalars(select(AuditLog).where(AuditLog.outcome == "denied")).all()
        assert {(d.actor, d.action) for d in denied} >= {
            ("analyst", "models.approve"),
            ("expert", "models.reject"),
            ("analyst", "models.rollback"),
            ("expert", "users.create"),
        }
        r = client.post(
            "/api/v1/users",
            json={"username": "newbie", "role": "domain_expert", "password": "long-enough"},
            headers=dep.auth("admin"),
        )
        assert r.status_code == 201
        ok = client.post("/api/v1/models/2/approve", json=decision, headers=dep.auth("lead"))
        assert ok.status_code == 200, ok.text
        assert (ok.json()["from_version"], ok.json()["to_version"]) == (1, 2)
        wait_until(
            lambda: (
                client.get("/api/v1/models/aliases", headers=dep.auth("expert")).json()["serving"][
                    "version"
                ]
                == 2
            ),
            what="serving to switch to v2",
        )
        history = client.get("/api/v1/models/history", headers=dep.auth("analyst")).json()
        assert [e["action"] for e in history["events"]] == ["approve", "set_challenger", "approve"]
        back = client.post(
            "/api/v1/models/rollback", json={"reason": "back to v1"}, headers=dep.auth("lead")
        )
        assert back.status_code == 200 and back.json()["to_version"] == 1
        engine.dispose()


# --------------------------------------------------------------------------- hostile input


def _img(mode: str, size=(28, 28), fmt="PNG", **save) -> bytes:
    rng = np.random.default_rng(0)
    w, h = size
    if mode == "I;16":
        im = PILImage.frombytes("I;16", size, (rng.random((h, w)) * 65535).astype("<u2").tobytes())
    elif mode == "1":
        im = PILImage.frombytes("L", size, rng.integers(0, 256, (h, w), np.uint8).tobytes())
        im = im.convert("1")
    else:
        bands = len(PILImage.new(mode, (1, 1)).getbands())
        im = PILImage.frombytes(mode, size, rng.integers(0, 256, (h, w, bands), np.uint8).tobytes())
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.js", "alert(document.cookie)" * 5)
    return buf.getvalue()


def _hostile() -> list[tuple[str, bytes, str, set[str]]]:
    png = _png()[0]
    jpeg = _img("RGB", size=(200, 200), fmt="JPEG")
    gif = _img("L", fmt="GIF")
    big_noise = _img("RGB", size=(400, 400), fmt="PNG")  # ~480 kB > 300 kB limit
    bomb = io.BytesIO()
    PILImage.new("1", (3000, 3000)).save(bomb, "PNG")  # 9 Mpx in a few kB
    zero_dim = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    )
    zero_dim += _png_chunk(b"IEND", b"")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside the IHDR CRC
    script_chunk = (
        png[:33] + _png_chunk(b"tEXt", b"Comment\x00<script>alert(1)</script>") + png[33:]
    )
    ico, ppm, pcx = (_img("RGB", size=(16, 16), fmt=f) for f in ("ICO", "PPM", "PCX"))
    bmp = _img("RGB", fmt="BMP")
    webp = _img("RGB", fmt="WEBP")
    rng = np.random.default_rng(7)
    return [
        ("empty", b"", "image/png", {"empty_file"}),
        ("one byte", b"{", "image/png", {"not_an_image"}),
        ("three bytes", b"\xc3\x83\n", "application/octet-stream", {"not_an_image"}),
        ("text", b"hello, this is not an image\n" * 3, "image/png", {"not_an_image"}),
        (
            "html",
            b"<!doctype html><html><script>alert(1)</script></html>",
            "text/html",
            {"unsupported_media_type"},
        ),
        ("json", b'{"image": "no"}', "application/octet-stream", {"not_an_image"}),
        ("random", rng.bytes(2048), "application/octet-stream", {"not_an_image"}),
        (
            "pdf",
            b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
            "application/octet-stream",
            {"not_an_image"},
        ),
        (
            "svg",
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>',
            "image/svg+xml",
            {"unsupported_media_type"},
        ),
        ("zip", _zip(), "application/zip", {"unsupported_media_type"}),
        (
            "elf",
            b"\x7fELF\x02\x01\x01" + b"\x00" * 200,
            "application/octet-stream",
            {"not_an_image"},
        ),
        ("truncated png", png[: len(png) // 2], "image/png", {"corrupt_image"}),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", {"corrupt_image"}),
        ("truncated bmp", bmp[: len(bmp) // 2], "image/bmp", {"corrupt_image"}),
        ("truncated webp", webp[: len(webp) // 2], "image/webp", {"corrupt_image"}),
        ("png bad crc", bytes(bad_crc), "image/png", {"corrupt_image", "not_an_image"}),
        ("png zero size", zero_dim, "image/png", {"corrupt_image", "not_an_image"}),
        ("bytes over limit", big_noise, "image/png", {"too_large"}),
        ("decompression bomb", bomb.getvalue(), "image/png", {"too_many_pixels"}),
        ("png + zip polyglot", png + _zip(), "image/png", {"polyglot"}),
        (
            "png + html polyglot",
            png + b"<html><script>alert(1)</script></html>" * 2,
            "image/png",
            {"polyglot"},
        ),
        ("png with script chunk", script_chunk, "image/png", {"polyglot"}),
        (
            "gif + js polyglot",
            gif + b"/*" + b"a" * 40 + b"*/alert(document.domain)//",
            "image/gif",
            {"polyglot"},
        ),
        (
            "jpeg + php polyglot",
            jpeg + b"<?php system($_GET['c']); ?>",
            "image/jpeg",
            {"polyglot"},
        ),
        ("png labelled jpeg", png, "image/jpeg", {"content_type_mismatch"}),
        ("jpeg labelled png", jpeg, "image/png", {"content_type_mismatch"}),
        ("png labelled html", png, "text/html", {"unsupported_media_type"}),
        ("png labelled pdf", png, "application/pdf", {"unsupported_media_type"}),
        ("png labelled svg", png, "image/svg+xml", {"unsupported_media_type"}),  # issue 16
        ("ico", ico, "image/x-icon", {"unsupported_media_type"}),
        ("ico, undeclared", ico, "application/octet-stream", {"unsupported_format"}),
        ("ppm", ppm, "application/octet-stream", {"unsupported_format"}),
        ("pcx", pcx, "application/octet-stream", {"unsupported_format", "not_an_image"}),
    ]


HOSTILE = _hostile()


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory, trained_artifacts, pg_factory):
    """One server for the whole corpus (SQLite + local folder)."""
    tmp = tmp_path_factory.mktemp("hostile")
    dep = local_deploy(tmp, trained_artifacts["strong"])
    app = create_app(dep.settings(), with_demo=False)
    with TestClient(app) as client:
        yield dep, client


@pytest.mark.parametrize(("name", "data", "ctype", "codes"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_upload_is_refused_and_leaves_nothing(hostile_client, name, data, ctype, codes):
    dep, client = hostile_client
    before = _counts(dep)
    keys_before = set(dep.storage().list(""))
    r = client.post(
        "/api/v1/predictions", files={"file": ("x.bin", data, ctype)}, headers=dep.auth("expert")
    )
    body = r.json()
    assert body["error"] in codes, r.text
    assert r.status_code == STATUS[body["error"]] and 400 <= r.status_code < 500
    assert set(body) == {"error", "detail"} and len(body["detail"]) > 10
    assert client.app.state.service.outbox.depth() == 0
    assert _counts(dep) == before
    assert set(dep.storage().list("")) == keys_before
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_corpus_has_at_least_25_files():
    assert len(HOSTILE) >= 25


def test_request_level_limits(hostile_client):
    dep, client = hostile_client
    h = dep.auth("expert")
    png = _png()[0]
    many = [("files", (f"{i}.png", png, "image/png")) for i in range(9)]
    r = client.post("/api/v1/predictions/batch", files=many, headers=h)
    assert (r.status_code, r.json()["error"]) == (413, "too_many_files")
    r = client.post("/api/v1/predictions", headers=h)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request")
    huge = b"x" * (300_000 * 8 + 70 * 1024)
    r = client.post("/api/v1/predictions", files={"file": ("a.png", huge, "image/png")}, headers=h)
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    # one bad file in a batch rejects the whole batch and writes nothing
    before = _counts(dep)
    mixed = [("files", ("a.png", png, "image/png")), ("files", ("b.png", b"", "image/png"))]
    r = client.post("/api/v1/predictions/batch", files=mixed, headers=h)
    assert r.status_code == 422 and r.json()["detail"].startswith("image 2 of 2")
    assert _counts(dep) == before and client.app.state.service.outbox.depth() == 0


def _tricky_valid() -> list[tuple[str, bytes]]:
    out = []
    for mode in ("L", "LA", "RGBA", "RGB", "1", "I;16"):
        out.append((f"png {mode}", _img(mode)))
    pal = PILImage.new("P", (28, 28))
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out.append(("png P transparent", buf.getvalue()))
    out.append(("jpeg CMYK", _img("CMYK", fmt="JPEG")))
    frames = [PILImage.new("L", (28, 28), c) for c in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out.append(("animated gif", buf.getvalue()))
    rot = PILImage.new("L", (20, 28), 255)
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    rot.save(buf, "JPEG", exif=exif)
    out.append(("jpeg exif rotated", buf.getvalue()))
    for fmt in ("TIFF", "BMP", "WEBP"):
        out.append((fmt.lower(), _img("RGB", fmt=fmt)))
    return out


@pytest.mark.parametrize(("name", "data"), _tricky_valid(), ids=[t[0] for t in _tricky_valid()])
def test_unusual_but_valid_images_are_predicted(hostile_client, name, data):
    dep, client = hostile_client
    r = client.post(
        "/api/v1/predictions",
        files={"file": ("x", data, "application/octet-stream")},
        headers=dep.auth("expert"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["label"] in [str(d) for d in range(10)]


def test_canonical_conversions_are_right():
    from quarkflow_core.ml.transforms import canonical_image

    sixteen = PILImage.frombytes("I;16", (4, 4), np.full((4, 4), 65535, "<u2").tobytes())
    assert np.asarray(canonical_image(sixteen)).max() == 255  # scaled, not clipped to 255 of 65535
    half = PILImage.frombytes("I;16", (4, 4), np.full((4, 4), 32896, "<u2").tobytes())
    assert abs(int(np.asarray(canonical_image(half))[0, 0]) - 128) <= 1
    clear = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert canonical_image(clear).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert canonical_image(PILImage.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    rot = PILImage.new("L", (20, 28))
    exif = rot.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rot.save(buf, "JPEG", exif=exif)
    assert canonical_image(PILImage.open(io.BytesIO(buf.getvalue()))).size == (28, 20)


def test_review_threshold_is_the_serving_models_own_unless_set(deployment):
    """QF_REVIEW_THRESHOLD unset: the served model's calibrated threshold (from its manifest)
    decides what goes to review; set: that value, for every model."""
    from dataclasses import replace

    app = create_app(deployment.settings(review_threshold=None), with_demo=False, watch=False)
    data, _ = _png(0)
    with TestClient(app) as client:
        holder = app.state.service.holder
        served = holder.current
        assert served.review_threshold is None and served.threshold() == 0.8  # no calibration
        for own, expected in ((1.0, True), (0.0, False)):
            holder.swap(replace(served, review_threshold=own))
            r = client.post(
                "/api/v1/predictions",
                files={"file": ("d.png", data, "image/png")},
                headers=deployment.auth("expert"),
            )
            assert r.status_code == 200 and r.json()["review"] is expected
    assert replace(served, review_threshold=0.3).threshold(0.9) == 0.9  # the setting wins


def test_what_the_database_would_refuse_is_refused_before_it_is_acknowledged(deployment):
    """Issue 16: an over-long X-Request-Id, NUL bytes in text or in a path id were accepted
    (2xx) and then refused by Postgres (dead letters, or a 500). Now each is a 4xx naming the
    field, nothing is written, and a value at the limit lands."""
    dep = deployment
    app = create_app(dep.settings(), with_demo=False)
    h = dep.auth("expert")
    with TestClient(app) as client:
        before = _counts(dep)
        long_id = client.post(
            "/api/v1/predictions",
            files={"file": ("d.png", _png()[0], "image/png")},
            headers={**h, "X-Request-Id": "r" * 65},
        )
        assert long_id.status_code == 400 and long_id.json()["error"] == "invalid_header"
        assert "X-Request-Id" in long_id.json()["detail"]
        ok = client.post(
            "/api/v1/predictions",
            files={"file": ("d.png", _png()[0], "image/png")},
            headers={**h, "X-Request-Id": "r" * 64},
        )
        assert ok.status_code == 200
        pid = ok.json()["id"]
        nul_comment = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            json={"verdict": "wrong", "true_label": "7", "comment": "bad\x00byte"},
            headers=h,
        )
        assert nul_comment.status_code == 422 and "comment" in nul_comment.json()["detail"]
        nul_label = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            json={"verdict": "wrong", "true_label": "7\x00"},
            headers=h,
        )
        assert nul_label.status_code == 422 and "true_label" in nul_label.json()["detail"]
        for path in (
            "/api/v1/predictions/abc%00def",
            "/api/v1/predictions/abc%00def/feedback",
            "/api/v1/models/v1%00",
            "/api/v1/images/ab%00cd",
        ):
            method = client.post if path.endswith("feedback") else client.get
            kwargs = {"json": {"verdict": "wrong"}} if path.endswith("feedback") else {}
            r = method(path, headers=dep.auth("lead"), **kwargs)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        reason = client.post(
            "/api/v1/models/v1/approve", json={"reason": "ok\x00"}, headers=dep.auth("lead")
        )
        assert reason.status_code == 422 and "reason" in reason.json()["detail"]
        wait_until(lambda: _counts(dep)[1] == before[1] + 1, what="the accepted prediction")
        assert client.get("/readyz").json()["checks"]["outbox"]["depth"] == 0
    engine = dep.engine()
    with Session(engine) as s:
        assert s.get(Prediction, pid).request_id == "r" * 64
        assert s.scalar(select(func.count()).select_from(Feedback)) == before[2]
    engine.dispose()


def test_a_revoked_token_stops_working_at_once(deployment):
    """Issue 16: the token cache accepted a revoked token for up to 60 s."""
    from quarkflow_core.schema import ApiToken
    from quarkflow_core.users import revoke_token

    dep = deployment
    app = create_app(dep.settings(), with_demo=False)
    with TestClient(app) as client:
        me = client.get("/api/v1/whoami", headers=dep.auth("analyst"))
        assert me.status_code == 200
        engine = dep.engine()
        with Session(engine) as s:
            token_id = s.scalar(
                select(ApiToken.id)
                .join(User, User.id == ApiToken.user_id)
                .where(User.username == "analyst")
            )
            revoke_token(session=s, token_id=token_id)
            s.commit()
        engine.dispose()
        gone = client.get("/api/v1/whoami", headers=dep.auth("analyst"))
        assert gone.status_code == 401 and "revoked" in gone.json()["detail"]
        assert client.get("/api/v1/whoami", headers=dep.auth("expert")).status_code == 200

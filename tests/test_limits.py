"""Issue 16: decoding memory stays bounded (pixels per request, pixels decoded at once per
process, frames freed once converted), every /api body has its route's limit (413 chunked or
not), and an unexpected error is a JSON 500 that keeps the client's keep-alive connection.
The live tests run a real `quarkflow serve` (uvicorn decides what happens to a connection)."""

from __future__ import annotations

import functools
import io
import sqlite3
import threading
import time
import weakref

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, File, UploadFile
from helpers.serving import ServerProcess, free_port, local_deploy, wait_until
from PIL import Image as PILImage
from PIL import ImageDraw, ImageOps

from app.api import STATUS, BodyLimits
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import InvalidInput
from quarkflow_core.images import DecodeBudget, DecodeBusy, prepare_uploads
from quarkflow_core.ml import transforms

BIG = 6000  # 6000 x 6000 = 36 Mpx: 144 MB as a decoded RGB(A) frame, ~150 KB as a PNG
MAX_DECODING = 40_000_000  # the server below decodes one such image at a time
MAX_REQUEST = 300_000_000  # 8 of them per request pass, 9 do not
MAX_UPLOAD = 3_000_000
BYTES_PER_PIXEL = 9  # measured worst case of decoding + converting (RGBA: frame, RGB, L)


def _png(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@functools.cache
def big_png(mode: str = "RGB") -> bytes:
    """A large-but-small-file PNG: mostly one colour, with a ring so it is not trivial."""
    colour = (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)
    img = PILImage.new(mode, (BIG, BIG), colour)
    ImageDraw.Draw(img).ellipse((1500, 1500, 4500, 4500), outline=(0,) * len(colour), width=40)
    data = _png(img)
    assert len(data) < 300_000
    return data


# --------------------------------------------------------------------------- units


def _canonical_before(img: PILImage.Image) -> PILImage.Image:
    """canonical_image as it was before it worked in strips (whole-frame copies)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F":
            top = max(float(np.abs(arr).max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255)
        return PILImage.fromarray(arr.astype(np.uint8))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PILImage.alpha_composite(background, rgba).convert("RGB")
        return img.convert("L") if mode in ("LA", "La") else img
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def _every_mode() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    palette = PILImage.fromarray(rgba[..., :3]).convert("P", colors=64)
    images = {
        "RGBA": PILImage.fromarray(rgba),
        "RGB": PILImage.fromarray(rgba[..., :3]),
        "L": PILImage.fromarray(rgba[..., 0]),
        "LA": PILImage.fromarray(rgba).convert("LA"),
        "P": palette,
        "1": PILImage.fromarray(rgba[..., 0]).convert("1"),
        "CMYK": PILImage.fromarray(rgba[..., :3]).convert("CMYK"),
        "I;16": PILImage.fromarray(rng.integers(0, 65536, (37, 23)).astype(np.uint16)),
        "I": PILImage.fromarray(rng.integers(-5000, 300_000, (37, 23)).astype(np.int32)),
        "F": PILImage.fromarray(rng.normal(0, 1000, (37, 23)).astype(np.float32)),
    }
    out = []
    for mode, img in images.items():
        fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append((mode, buf.getvalue()))
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=5)
    out.append(("P+transparency", buf.getvalue()))
    buf = io.BytesIO()
    palette.save(buf, "GIF", save_all=True, append_images=[palette.rotate(90)], transparency=3)
    out.append(("animated GIF", buf.getvalue()))
    rotated = images["RGB"].getexif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 270
    buf = io.BytesIO()
    images["RGB"].save(buf, "JPEG", exif=rotated.tobytes())
    out.append(("JPEG, EXIF rotated", buf.getvalue()))
    return out


@pytest.mark.unit
@pytest.mark.parametrize(("name", "data"), _every_mode(), ids=[m for m, _ in _every_mode()])
def test_canonical_image_in_strips_is_bit_identical(monkeypatch, name, data):
    """Serving must preprocess exactly as evaluation did: the strip-by-strip conversions give
    the very pixels the whole-frame ones gave (strips of 2 rows here, so many boundaries)."""
    monkeypatch.setattr(transforms, "_STRIP_PIXELS", 50)
    before = _canonical_before(PILImage.open(io.BytesIO(data)))
    after = transforms.canonical_image(PILImage.open(io.BytesIO(data)))
    assert (after.mode, after.size) == (before.mode, before.size)
    assert np.array_equal(np.asarray(after), np.asarray(before))
    for preset in transforms.PRESETS.values():
        arr = preset.to_array(PILImage.open(io.BytesIO(data)))
        assert arr.shape == (preset.size, preset.size, preset.channels)


@pytest.mark.unit
def test_decode_budget_caps_pixels_first_come_first_served():
    budget = DecodeBudget(100, wait_s=5)
    admitted, peak = [], []
    release = threading.Event()

    def decode(name: str, pixels: int) -> None:
        with budget.reserve(pixels):
            admitted.append(name)
            peak.append(budget.in_use)
            release.wait(5)

    first = threading.Thread(target=decode, args=("first", 70))
    first.start()
    wait_until(lambda: budget.in_use == 70, timeout=5, what="the first reservation")
    big = threading.Thread(target=decode, args=("big", 60))  # waits: 70 + 60 > 100
    big.start()
    wait_until(lambda: len(budget._waiting) == 1, timeout=5, what="the big one to queue")
    small = threading.Thread(target=decode, args=("small", 10))  # would fit: queued behind
    small.start()
    wait_until(lambda: len(budget._waiting) == 2, timeout=5, what="the small one to queue")
    time.sleep(0.3)
    assert admitted == ["first"] and budget.in_use == 70  # the big one is not starved
    release.set()
    for t in (first, big, small):
        t.join(10)
    assert sorted(admitted) == ["big", "first", "small"] and max(peak) <= 100
    assert budget.in_use == 0 and not budget._waiting

    hurry = DecodeBudget(100, wait_s=0.2)
    with hurry.reserve(10_000):  # larger than the budget: decodes alone
        assert hurry.in_use == 100
        started = time.monotonic()
        with pytest.raises(DecodeBusy) as err, hurry.reserve(1):
            pass
        assert 0.15 < time.monotonic() - started < 3
    assert err.value.code == "busy" and STATUS["busy"] == 503
    assert "QF_MAX_DECODING_PIXELS" in err.value.detail
    assert hurry.in_use == 0 and not hurry._waiting


@pytest.mark.unit
def test_prepare_uploads_caps_request_pixels_and_frees_each_frame():
    png = _png(PILImage.new("RGB", (100, 100), "white"))
    codes = []
    with pytest.raises(InvalidInput) as err:
        prepare_uploads(
            [(png, "image/png")] * 3,
            convert=lambda img: None,
            max_request_pixels=29_999,
            on_reject=codes.append,
        )
    assert err.value.code == "too_many_pixels" and codes == ["too_many_pixels"]
    assert "30,000 pixels" in err.value.detail
    assert "29,999 (QF_MAX_REQUEST_PIXELS)" in err.value.detail

    frames: list[weakref.ref] = []
    budget = DecodeBudget(10_000)

    def convert(img: PILImage.Image) -> np.ndarray:
        assert budget.in_use == 10_000  # decoded under the budget
        assert all(ref() is None for ref in frames)  # the previous frame is already gone
        frames.append(weakref.ref(img))
        return np.asarray(img.resize((4, 4)))

    out = prepare_uploads(
        [(png, "image/png")] * 3, convert=convert, budget=budget, max_request_pixels=30_000
    )
    assert [a.shape for _, a in out] == [(4, 4, 3)] * 3 and budget.in_use == 0
    assert len(frames) == 3 and all(ref() is None for ref in frames)
    with pytest.raises(InvalidInput) as err:
        prepare_uploads([(png, None), (b"", None)], convert=convert, budget=budget)
    assert err.value.detail.startswith("image 2 of 2") and budget.in_use == 0


@pytest.mark.unit
def test_body_limits_follow_the_routes_file_parameters():
    app = FastAPI()

    @app.post("/api/one")
    def one(file: UploadFile = File(...)) -> None: ...

    @app.post("/api/many/{tag}")
    def many(tag: str, files: list[UploadFile] | None = File(None)) -> None: ...

    @app.post("/api/json")
    def plain(payload: dict) -> None: ...

    limits = BodyLimits(app.router.routes, json_bytes=1000, per_file=10_000, max_files=5)

    def scope(method: str, path: str) -> dict:
        return {"type": "http", "method": method, "path": path, "root_path": ""}

    framing = BodyLimits.FRAMING
    assert limits.for_scope(scope("POST", "/api/one"))[0] == 10_000 + framing
    assert limits.for_scope(scope("POST", "/api/many/x"))[0] == 50_000 + framing
    assert limits.for_scope(scope("GET", "/api/one")) == (1000, "QF_MAX_JSON_BYTES")
    assert limits.for_scope(scope("POST", "/api/json")) == (1000, "QF_MAX_JSON_BYTES")


# --------------------------------------------------------------------------- live server


def _vm(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1]) // 1024
            for line in f
            if line.startswith(("VmHWM", "VmRSS"))
        }


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


@pytest.fixture(scope="module")
def live(tmp_path_factory, trained_artifacts):
    tmp = tmp_path_factory.mktemp("limits")
    dep = local_deploy(tmp, trained_artifacts["strong"])
    env = dep.env(
        QF_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        QF_MAX_REQUEST_PIXELS=str(MAX_REQUEST),
        QF_MAX_DECODING_PIXELS=str(MAX_DECODING),
        QF_DECODE_WAIT_S="30",
    )
    server = ServerProcess(env, free_port(), tmp / "server.log")
    try:
        server.wait_live()
        wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, what="ready")
        yield dep, server
    finally:
        server.stop()


def _files(*images: bytes) -> list:
    return [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.mark.integration
def test_decoding_memory_stays_bounded(live):
    """Batches of 8 large-but-small-file PNGs, one after another and from 3 threads at once:
    the server's peak RSS grows by at most what the decoding budget allows (40 Mpx at 9
    bytes a pixel, + 200 MB for everything else), and falls back near its idle level. Before
    issue 16 one such batch grew it by 1.3 GB and three at once by 4.2 GB, kept afterwards."""
    dep, server = live
    pid = server.proc.pid
    small = demo_pngs(1)[0][0]
    rgb, rgba = big_png("RGB"), big_png("RGBA")
    with httpx.Client(base_url=server.url, headers=dep.auth("expert"), timeout=120) as client:
        warm = client.post("/api/v1/predictions/batch", files=_files(small, small))
        assert warm.status_code == 200, warm.text
        idle = _vm(pid)["VmRSS"]
        _reset_peak(pid)
        first = client.post("/api/v1/predictions/batch", files=_files(*[rgb] * 8))
    assert first.status_code == 200, first.text
    assert len(first.json()["predictions"]) == 8

    answers: list[httpx.Response] = []

    def send(images: list[bytes]) -> None:
        with httpx.Client(base_url=server.url, headers=dep.auth("expert"), timeout=120) as c:
            answers.append(c.post("/api/v1/predictions/batch", files=_files(*images)))

    threads = [
        threading.Thread(target=send, args=(images,))
        for images in ([rgb] * 8, [rgb] * 8, [rgba] + [rgb] * 7)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 3
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"] == "busy"
    peak = _vm(pid)["VmHWM"] - idle
    bound = MAX_DECODING * BYTES_PER_PIXEL // 2**20 + 200
    assert peak < bound, f"peak RSS grew by {peak} MB (bound {bound} MB)"
    deadline = time.monotonic() + 10
    while (grown := _vm(pid)["VmRSS"] - idle) >= 150 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert grown < 150, f"RSS stayed {grown} MB above idle after the load"


@pytest.mark.integration
def test_pixels_per_request_are_capped(live):
    dep, server = live
    r = httpx.post(
        server.url + "/api/v1/predictions/batch",
        files=_files(*[big_png("RGB")] * 9),
        headers=dep.auth("expert"),
        timeout=60,
    )
    assert (r.status_code, r.json()["error"]) == (413, "too_many_pixels"), r.text
    assert f"{9 * BIG * BIG:,} pixels" in r.json()["detail"]
    assert f"{MAX_REQUEST:,} (QF_MAX_REQUEST_PIXELS)" in r.json()["detail"]


def _noise_png(nbytes: int) -> bytes:
    side = int((nbytes / 3) ** 0.5) + 1
    rng = np.random.default_rng(3)
    return _png(PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def _chunks(total: int, head: bytes = b"", tail: bytes = b"", size: int = 64 * 1024):
    yield head
    for _ in range(total // size):
        yield b"x" * size
    yield tail


@pytest.mark.integration
def test_body_limits_per_route_chunked_or_not(live):
    dep, server = live
    h = dep.auth("expert")
    upload_limit = MAX_UPLOAD + BodyLimits.FRAMING
    with httpx.Client(base_url=server.url, headers=h, timeout=60) as client:
        # a 2 MB image is fine on the upload route ...
        image = _noise_png(2_000_000)
        assert 2_000_000 < len(image) < MAX_UPLOAD
        r = client.post("/api/v1/predictions", files={"file": ("n.png", image, "image/png")})
        assert r.status_code == 200, r.text
        pid = r.json()["id"]
        # ... 2 MB of JSON is not, on a JSON route (Content-Length: refused before reading)
        big_json = b'{"verdict": "wrong", "comment": "' + b"x" * 2_000_000 + b'"}'
        r = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            content=big_json,
            headers={"Content-Type": "application/json"},
        )
        assert (r.status_code, r.json()["error"]) == (413, "too_large"), r.text
        detail = r.json()["detail"]
        assert f"{2**20:,} bytes" in detail and "QF_MAX_JSON_BYTES" in detail
        # the same without Content-Length (chunked): 413 too, not 400 "error parsing the body"
        r = client.post(
            f"/api/v1/predictions/{pid}/feedback",
            content=_chunks(2_000_000, b'{"verdict": "wrong", "comment": "', b'"}'),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in r.request.headers
        assert (r.status_code, r.json()["error"]) == (413, "too_large"), r.text
        assert f"{2**20:,} bytes" in r.json()["detail"]
        # a chunked multipart upload over the route's limit (one file + framing)
        boundary = "qfboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        r = client.post(
            "/api/v1/predictions",
            content=_chunks(MAX_UPLOAD + 200_000, head, f"\r\n--{boundary}--\r\n".encode()),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in r.request.headers
        assert (r.status_code, r.json()["error"]) == (413, "too_large"), r.text
        assert f"{upload_limit:,} bytes" in r.json()["detail"]
        # a small JSON body still works, and so does the connection
        r = client.post(f"/api/v1/predictions/{pid}/feedback", json={"verdict": "correct"})
        assert r.status_code == 201, r.text


@pytest.mark.integration
def test_unexpected_error_is_json_500_and_keeps_the_connection(live):
    """A row the code cannot read (corrupt JSON in predictions.topk) raises deep inside a real
    route: the answer is a JSON 500, and the client's next request goes over the same
    connection (before: uvicorn closed it after every 500)."""
    dep, server = live
    with httpx.Client(base_url=server.url, headers=dep.auth("expert"), timeout=60) as client:
        r = client.post(
            "/api/v1/predictions", files={"file": ("d.png", demo_pngs(2)[0][1], "image/png")}
        )
        assert r.status_code == 200, r.text
        pid = r.json()["id"]
        wait_until(
            lambda: client.get(f"/api/v1/predictions/{pid}").json()["logged"],
            what="the prediction to be logged",
        )
        db = sqlite3.connect(dep.database_url.removeprefix("sqlite:///"), timeout=30)
        with db:
            db.execute("UPDATE predictions SET topk = 'not json' WHERE id = ?", (pid,))
        db.close()

        def local_port(response: httpx.Response) -> int:
            return response.extensions["network_stream"].get_extra_info("client_addr")[1]

        before = client.get("/api/v1/whoami")
        assert before.status_code == 200
        broken = client.get(f"/api/v1/predictions/{pid}")
        assert broken.status_code == 500, broken.text
        assert broken.json() == {"error": "internal_error", "detail": "unexpected JSONDecodeError"}
        assert broken.headers.get("connection") != "close"
        after = client.get("/api/v1/whoami")
        assert after.status_code == 200
        assert local_port(before) == local_port(broken) == local_port(after)
    assert "unhandled error in GET /api/v1/predictions/" in server.log.read_text()

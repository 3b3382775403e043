"""Image bytes -> validated metadata -> content-addressed blob + ``images`` row."""

from __future__ import annotations

import ctypes
import hashlib
import io
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Image
from quarkflow_core.storage import Storage, content_key

ALLOWED_FORMATS = {
    "PNG": "png",
    "JPEG": "jpg",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "WEBP": "webp",
}
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "webp": "image/webp",
}
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
T = TypeVar("T")


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    format: str  # PNG / JPEG / ...
    ext: str
    width: int
    height: int
    mode: str
    size_bytes: int


def probe_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageInfo:
    """Check that ``data`` is one whole, allowed, reasonably sized image. Raises InvalidInput."""
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)[0]


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageInfo, PILImage.Image]:
    """``probe_image`` that also returns the decoded (first) frame, so that a caller that
    predicts on it does not decode the bytes twice. The frame is the decoder's own buffer
    (no copy): about 4 bytes a pixel for RGB/RGBA, 1 for L/P."""
    if not data:
        raise InvalidInput("the file is empty (0 bytes)", code="empty_file")
    if len(data) > max_bytes:
        raise InvalidInput(
            f"the file is {len(data):,} bytes; the limit is {max_bytes:,}", code="too_large"
        )
    identified = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            # Only the allowed decoders ever parse untrusted bytes.
            with PILImage.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
                identified = True
                fmt = img.format or "?"
                width, height = img.size
                mode = img.mode
                if width * height > max_pixels:
                    raise InvalidInput(
                        f"the image is {width}x{height} = {width * height:,} pixels; "
                        f"the limit is {max_pixels:,}",
                        code="too_many_pixels",
                    )
                img.load()  # decode fully: catches truncated files
                # frame 0, with its EXIF, usable after the file closes: what copy() returns,
                # sharing the decoded pixels instead of duplicating them
                decoded = img._new(img.im)
    except InvalidInput:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"the image is too large to decode safely: {exc}", code="too_many_pixels"
        ) from None
    except UnidentifiedImageError:
        other = _sniff_format(data)
        if other:
            raise InvalidInput(
                f"image format {other} is not allowed; use one of "
                + ", ".join(sorted(ALLOWED_FORMATS)),
                code="unsupported_format",
            ) from None
        raise InvalidInput("the file is not a recognisable image", code="not_an_image") from None
    except Exception as exc:  # decoders raise struct.error, zlib.error, EOFError ... too
        if not identified and not isinstance(exc, OSError | SyntaxError | ValueError):
            raise InvalidInput(
                f"the file is not a recognisable image ({type(exc).__name__})",
                code="not_an_image",
            ) from None
        raise InvalidInput(
            f"the image is damaged or truncated: {exc}", code="corrupt_image"
        ) from None
    info = ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        ext=ALLOWED_FORMATS[fmt],
        width=width,
        height=height,
        mode=mode,
        size_bytes=len(data),
    )
    return info, decoded


def _sniff_format(data: bytes) -> str | None:
    """Name a format Pillow recognises from the header alone (no pixel decoding)."""
    PILImage.init()
    head = data[:64]
    for fmt, (_factory, accept) in PILImage.OPEN.items():
        if fmt in ALLOWED_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return fmt
        except Exception:  # noqa: S112 - some plugins' header checks fail on short input
            continue
    return None


def get_image_by_sha(
    *, session: Session, sha256: str, project_id: int = DEFAULT_PROJECT_ID
) -> Image | None:
    """A project's image of these bytes (each project has its own row; the blob is shared)."""
    return session.scalar(
        select(Image).where(Image.project_id == project_id, Image.sha256 == sha256)
    )


def store_blob(storage: Storage, data: bytes, info: ImageInfo) -> bool:
    """Write the bytes at their content address (create-only); True when newly written."""
    key = content_key(info.sha256, ext=info.ext)
    return storage.put(key, data, content_type=CONTENT_TYPES[info.ext], overwrite=False).created


def image_row(info: ImageInfo, *, source: str, project_id: int = DEFAULT_PROJECT_ID) -> Image:
    """A project's ``images`` row for stored bytes (not yet added to a session)."""
    return Image(
        project_id=project_id,
        sha256=info.sha256,
        storage_key=content_key(info.sha256, ext=info.ext),
        width=info.width,
        height=info.height,
        format=info.format,
        size_bytes=info.size_bytes,
        source=source,
    )


def ingest_image(
    *,
    session: Session,
    storage: Storage,
    data: bytes,
    source: str,
    info: ImageInfo | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[Image, bool]:
    """Store the bytes once (blob first, then the project's row) and return (row, created).

    A blob without a row (a crash in between) is harmless: the next ingest of the same bytes
    reuses it. A row never points at a missing blob.
    """
    info = info or probe_image(data)
    existing = get_image_by_sha(session=session, sha256=info.sha256, project_id=project_id)
    if existing is not None:
        return existing, False
    store_blob(storage, data, info)
    row = image_row(info, source=source, project_id=project_id)
    session.add(row)
    session.flush()
    return row, True


# --------------------------------------------------------------------------- uploads

_DECLARED = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "image/webp": "WEBP",
    "image/x-png": "PNG",
}
_GENERIC = {"", "application/octet-stream", "binary/octet-stream"}
_MARKUP = (b"<script", b"<html", b"<?php", b"<svg", b"<!doctype", b"<body", b"<iframe", b"<?xml")


def _image_end(data: bytes, fmt: str) -> int | None:
    """Where the image stream ends for formats with an explicit end marker (None: unknown)."""
    if fmt == "PNG":
        pos = data.rfind(b"IEND")
        return None if pos < 0 else pos + 8  # chunk type + CRC
    if fmt == "JPEG":
        pos = data.rfind(b"\xff\xd9")
        return None if pos < 0 else pos + 2
    if fmt == "GIF":
        pos = data.rfind(b";")
        return None if pos < 0 else pos + 1
    return None


def validate_upload(
    data: bytes,
    *,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[ImageInfo, PILImage.Image]:
    """``probe_image`` plus the checks an upload needs: the declared content type must match
    the bytes, and nothing may hide after the image (polyglots: an image that is also HTML,
    a script or an archive)."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared and declared not in _GENERIC and declared not in _DECLARED:
        accepted = ", ".join(sorted(set(_DECLARED)))
        what = "an image type this service reads" if declared.startswith("image/") else "an image"
        raise InvalidInput(
            f"the upload is declared as {declared!r}, not as {what} (accepted: {accepted}, "
            "or application/octet-stream)",
            code="unsupported_media_type",
        )
    info, image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    if declared in _DECLARED and _DECLARED[declared] != info.format:
        raise InvalidInput(
            f"the upload is declared as {declared} but its bytes are {info.format}",
            code="content_type_mismatch",
        )
    end = _image_end(data, info.format)
    tail = data[end:] if end is not None else b""
    if tail.strip(b"\x00\r\n\t ") and len(tail) > 16:
        raise InvalidInput(
            f"{len(tail):,} bytes of other content follow the {info.format} image "
            "(a polyglot file); upload the plain image",
            code="polyglot",
        )
    edges = (data[:4096] + b"\n" + data[-4096:]).lower()
    if any(marker in edges for marker in _MARKUP):
        raise InvalidInput(
            "the file carries markup or script next to the image data (a polyglot file)",
            code="polyglot",
        )
    return info, image


# --------------------------------------------------------------------------- decoding budget


class DecodeBusy(QuarkflowError):
    """Too many pixels are being decoded in this process right now (HTTP 503: retry)."""

    code = "busy"


class DecodeBudget:
    """A cap on the pixels this process decodes at once (one per serving process).

    A small compressed file can decode to a huge frame (a 150 KB PNG of 6000x6000 is 144 MB as
    RGB), so the memory a server needs follows the pixels it decodes concurrently, not the
    bytes it receives. Each image reserves its width x height before it is decoded and gives
    it back once it is converted to the model's input; reservations are served first come,
    first served (a large image is not starved by a stream of small ones), and a reservation
    that cannot be served within ``wait_s`` raises ``DecodeBusy``. An image larger than the
    whole budget waits until it can decode alone."""

    def __init__(self, max_pixels: int, *, wait_s: float = 10.0) -> None:
        if max_pixels < 1:
            raise ValueError("max_pixels must be at least 1")
        self.capacity = max_pixels
        self.wait_s = wait_s
        self.in_use = 0
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        need = min(max(int(pixels), 1), self.capacity)
        ticket = object()
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.in_use + need > self.capacity:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusy(
                            f"the server is decoding {self.in_use:,} pixels of other uploads "
                            f"(QF_MAX_DECODING_PIXELS = {self.capacity:,}) and this image "
                            f"needs {need:,}; retry shortly"
                        )
                    self._cond.wait(remaining)
                self.in_use += need
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def give_large_frees_back(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more (decoded frames, the
    strips of a conversion) with its own mapping, returned to the system when freed. By
    default glibc raises that threshold (up to 32 MB) each time a large block is freed, after
    which frames come from per-thread arenas that keep the memory: on ``quarkflow serve``, 3
    concurrent batches of 8 6000x6000 PNGs peaked 870 MB above the idle RSS and left it 840
    MB up; with this, 340 MB and back within 30 MB. Process-wide, idempotent; False (nothing
    done) off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def header_pixels(data: bytes) -> int:
    """width x height as the file's header declares it, without decoding any pixels (0 when
    the header is unreadable: the full validation then names the problem)."""
    try:
        with PILImage.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            width, height = img.size
            return width * height
    except Exception:  # any malformed header (or a bomb): validate_upload reports it properly
        return 0


def prepare_uploads(
    uploads: Sequence[tuple[bytes, str | None]],
    *,
    convert: Callable[[PILImage.Image], T],
    budget: DecodeBudget | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_request_pixels: int | None = None,
    on_reject: Callable[[str], object] | None = None,
) -> list[tuple[ImageInfo, T]]:
    """Validate every upload (``validate_upload``) and ``convert`` its decoded frame (e.g. to
    the model's input array), one image at a time under ``budget``; each full-size frame is
    dropped as soon as it is converted, so a request holds at most one decoded frame.

    The pixels the headers declare, summed over the request, must not exceed
    ``max_request_pixels`` (checked before anything is decoded). Raises InvalidInput (an
    upload's problem, prefixed "image i of n" in a batch; ``on_reject`` gets its code) or
    DecodeBusy."""
    sizes = [header_pixels(data) for data, _ in uploads]
    total = sum(sizes)
    if max_request_pixels is not None and total > max_request_pixels:
        if on_reject:
            on_reject("too_many_pixels")
        raise InvalidInput(
            f"the {len(uploads)} image(s) of this request hold {total:,} pixels together; "
            f"the limit per request is {max_request_pixels:,} (QF_MAX_REQUEST_PIXELS)",
            code="too_many_pixels",
        )
    out: list[tuple[ImageInfo, T]] = []
    for i, ((data, content_type), pixels) in enumerate(zip(uploads, sizes, strict=True)):
        try:
            with budget.reserve(pixels) if budget is not None else nullcontext():
                info, image = validate_upload(
                    data, content_type=content_type, max_bytes=max_bytes, max_pixels=max_pixels
                )
                converted = convert(image)
                del image  # freed before the reservation is given back
        except InvalidInput as exc:
            if on_reject:
                on_reject(exc.code)
            if len(uploads) > 1:
                exc.detail = f"image {i + 1} of {len(uploads)}: {exc.detail}"
            raise
        out.append((info, converted))
    return out

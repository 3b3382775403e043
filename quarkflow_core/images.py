"""Image bytes -> validated metadata -> content-addressed blob + ``images`` row."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput
from quarkflow_core.schema import Image
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
    predicts on it does not decode the bytes twice."""
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
                decoded = img.copy()  # frame 0, with its EXIF; usable after the file closes
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


def get_image_by_sha(*, session: Session, sha256: str) -> Image | None:
    return session.scalar(select(Image).where(Image.sha256 == sha256))


def store_blob(storage: Storage, data: bytes, info: ImageInfo) -> bool:
    """Write the bytes at their content address (create-only); True when newly written."""
    key = content_key(info.sha256, ext=info.ext)
    return storage.put(key, data, content_type=CONTENT_TYPES[info.ext], overwrite=False).created


def image_row(info: ImageInfo, *, source: str) -> Image:
    """The ``images`` row for stored bytes (not yet added to a session)."""
    return Image(
        sha256=info.sha256,
        storage_key=content_key(info.sha256, ext=info.ext),
        width=info.width,
        height=info.height,
        format=info.format,
        size_bytes=info.size_bytes,
        source=source,
    )


def ingest_image(
    *, session: Session, storage: Storage, data: bytes, source: str, info: ImageInfo | None = None
) -> tuple[Image, bool]:
    """Store the bytes once (blob first, then the row) and return (row, created).

    A blob without a row (a crash in between) is harmless: the next ingest of the same bytes
    reuses it. A row never points at a missing blob.
    """
    info = info or probe_image(data)
    existing = get_image_by_sha(session=session, sha256=info.sha256)
    if existing is not None:
        return existing, False
    store_blob(storage, data, info)
    row = image_row(info, source=source)
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

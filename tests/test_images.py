"""Image probing on real photos (skimage) and on broken files."""

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata

from quarkflow_core.errors import InvalidInput
from quarkflow_core.images import ingest_image, probe_image

pytestmark = pytest.mark.unit


def _encode(array, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_real_photos_probe(fmt):
    photo = skdata.astronaut()  # 512x512 RGB, shipped with scikit-image
    info = probe_image(_encode(photo, fmt))
    assert (info.width, info.height, info.format) == (512, 512, fmt)
    assert len(info.sha256) == 64


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "empty_file"),
        (b"just some text, not an image", "not_an_image"),
        (None, "corrupt_image"),  # truncated PNG, built below
    ],
)
def test_broken_files_are_refused_with_a_code(payload, code):
    if payload is None:
        payload = _encode(skdata.camera(), "PNG")[:4000]
    with pytest.raises(InvalidInput) as err:
        probe_image(payload)
    assert err.value.code == code


def test_size_limits():
    png = _encode(np.zeros((100, 100), dtype=np.uint8), "PNG")
    with pytest.raises(InvalidInput) as err:
        probe_image(png, max_bytes=10)
    assert err.value.code == "too_large"
    with pytest.raises(InvalidInput) as err:
        probe_image(png, max_pixels=5_000)
    assert err.value.code == "too_many_pixels"


def test_disallowed_format():
    buf = io.BytesIO()
    PILImage.new("RGB", (32, 32)).save(buf, format="ICO")
    with pytest.raises(InvalidInput) as err:
        probe_image(buf.getvalue())
    assert err.value.code == "unsupported_format"


@pytest.mark.integration
def test_ingest_is_content_addressed(db_session, storage):
    png = _encode(skdata.coins(), "PNG")
    row, created = ingest_image(session=db_session, storage=storage, data=png, source="upload")
    again, created_again = ingest_image(
        session=db_session, storage=storage, data=png, source="upload"
    )
    assert created and not created_again and again.id == row.id
    assert storage.get(row.storage_key) == png
    assert list(storage.list("images/")) == [row.storage_key]

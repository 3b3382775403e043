"""The synthetic detection data set (issue 18): real MNIST digits on real scikit-image photos,
checked for determinism, exact boxes, spacing, size buckets, visibility and offline loading."""

import io
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image as PILImage

from quarkflow_core.detection import (
    coco_size_bucket,
    digits_on_photos,
    encode_png,
    iter_digits_on_photos,
    synth,
)
from quarkflow_core.errors import InvalidInput

pytestmark = pytest.mark.unit

SEED, N, SIZE = 3, 60, 320


@pytest.fixture(scope="module")
def samples():
    return digits_on_photos(N, seed=SEED)


def _background(seed: int, k: int) -> np.ndarray:
    """Image k's photo before any digit was pasted: the first draw of its own generator."""
    return synth._background(synth._image_rng(seed, k), SIZE)[1]


def _luma(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) @ synth.LUMA


def _iou(a, b) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _same(a, b) -> bool:
    return (
        np.array_equal(a.image, b.image)
        and np.array_equal(a.boxes, b.boxes)
        and a.labels == b.labels
        and np.array_equal(a.instances, b.instances)
    )


def test_the_photos_ship_with_scikit_image(monkeypatch, tmp_path):
    """No photo may be fetched: with the download cache emptied and any download attempt made
    an error (scikit-image would otherwise *skip* a test whose download fails), every photo
    still loads. ``eagle``, which scikit-image downloads, proves the guard bites."""
    from skimage import data as skdata
    from skimage.data import _fetchers

    def no_download(name, *args, **kwargs):
        raise AssertionError(f"{name} is not in the scikit-image wheel: it would be downloaded")

    monkeypatch.setattr(_fetchers, "_image_fetcher", None)
    monkeypatch.setattr(_fetchers, "data_dir", str(tmp_path / "data"))
    monkeypatch.setattr(_fetchers, "_skip_pytest_case_requiring_pooch", no_download)
    with pytest.raises(AssertionError, match="eagle"):
        skdata.eagle()
    synth._photos.cache_clear()
    try:
        photos = synth._photos()
    finally:
        synth._photos.cache_clear()
    assert [name for name, _ in photos] == list(synth.PHOTOS)
    assert all(p.mode == "RGB" and min(p.size) >= 300 for _, p in photos)


def test_same_seed_same_images_other_seed_other_images(samples):
    again = digits_on_photos(5, seed=SEED)
    assert all(_same(a, b) for a, b in zip(again, samples[:5], strict=True))
    other = digits_on_photos(5, seed=SEED + 1)
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(other, samples, strict=False))
    assert [a.boxes.tolist() for a in other] != [b.boxes.tolist() for b in samples[:5]]


def test_images_do_not_depend_on_other_generators_or_global_state(samples):
    """Interleaving two data sets and moving numpy's global state changes nothing."""
    np.random.seed(1)
    mine, theirs = iter_digits_on_photos(4, seed=SEED), iter_digits_on_photos(4, seed=99)
    got = []
    for _ in range(4):
        next(theirs)
        np.random.random(1000)
        got.append(next(mine))
    assert all(_same(a, b) for a, b in zip(got, samples[:4], strict=True))


def test_two_to_six_digits_per_image_inside_it(samples):
    for s in samples:
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.labels), 4)
        assert 2 <= len(s.labels) <= 6
        assert set(s.labels) <= {str(d) for d in range(10)}
        assert s.background in synth.PHOTOS
        x1, y1, x2, y2 = s.boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= SIZE).all() and (y2 <= SIZE).all()
        assert (x2 > x1).all() and (y2 > y1).all()
        long_side = np.maximum(x2 - x1, y2 - y1)
        assert (long_side >= 12).all() and (long_side <= 180).all()


def test_boxes_are_tight_around_the_digit_pixels(samples):
    """Each box is exactly the extent of its digit's pixels (so every border row and column
    holds one), those pixels show the digit, and no pixel just outside the box carries the
    digit at half strength or more (only its faint anti-aliased rim lies there)."""
    checked = 0
    for k, s in enumerate(samples):
        ground = _luma(_background(SEED, k))
        shown = _luma(s.image)
        assert s.instances.max() == len(s.labels)
        for j, box in enumerate(s.boxes.astype(int)):
            ys, xs = np.nonzero(s.instances == j + 1)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
            assert np.median(np.abs(shown[ys, xs] - ground[ys, xs])) > 60
            # the digit's colour: its most extreme luma (alpha 1 shows the colour itself)
            brighter = shown[ys, xs].mean() > ground[ys, xs].mean()
            colour = np.percentile(shown[ys, xs], 99 if brighter else 1)
            x1, y1, x2, y2 = box
            ring = np.zeros(shown.shape, dtype=bool)
            ring[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
            ring[y1:y2, x1:x2] = False
            ring &= (s.instances == 0) & (np.abs(colour - ground) > 50)
            for i, (u1, v1, u2, v2) in enumerate(s.boxes.astype(int)):
                if i != j:  # leave out another digit's own rim
                    ring[max(v1 - 6, 0) : v2 + 6, max(u1 - 6, 0) : u2 + 6] = False
            strength = (shown[ring] - ground[ring]) / (colour - ground[ring])
            assert (strength < 0.55).all(), (k, j, strength.max())
            checked += int(ring.sum())
    assert checked > 10_000


def test_boxes_keep_apart(samples):
    for s in samples:
        for a, b in combinations(s.boxes.tolist(), 2):
            assert _iou(a, b) <= 0.05
    for s in digits_on_photos(10, seed=SEED, max_iou=0.0):
        for a, b in combinations(s.boxes.tolist(), 2):
            assert _iou(a, b) == 0.0


def test_all_size_buckets_and_all_digits_appear(samples):
    buckets = Counter(coco_size_bucket(b) for s in samples for b in s.boxes)
    assert min(buckets[b] for b in ("small", "medium", "large")) >= 10, buckets
    assert set(Counter(label for s in samples for label in s.labels)) == {str(d) for d in range(10)}


def test_png_round_trip_keeps_the_pixels(samples):
    for s in samples[:5]:
        png = encode_png(s)
        assert png.startswith(b"\x89PNG")
        back = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"))
        assert np.array_equal(back, s.image)


def test_digits_are_visible_on_their_photo(samples):
    """Against the photo before pasting: a digit of 24 px or more changes its box by more than
    20 grey levels on average, and its own pixels by far more. The untouched photo is checked
    first, so the comparison is against the right background."""
    checked = 0
    for k, s in enumerate(samples):
        photo = _background(SEED, k)
        away = np.ones((SIZE, SIZE), dtype=bool)
        for x1, y1, x2, y2 in s.boxes.astype(int):
            away[max(y1 - 10, 0) : y2 + 10, max(x1 - 10, 0) : x2 + 10] = False
        assert np.array_equal(s.image[away], np.rint(photo[away]).astype(np.uint8))
        diff = np.abs(_luma(s.image) - _luma(photo))
        for j, (x1, y1, x2, y2) in enumerate(s.boxes.astype(int)):
            if max(x2 - x1, y2 - y1) >= 24:
                assert diff[y1:y2, x1:x2].mean() > 20, (k, j)
                assert diff[s.instances == j + 1].mean() > 80, (k, j)
                checked += 1
    assert checked >= 100


def test_coco_size_buckets_at_their_limits():
    assert coco_size_bucket((0, 0, 31, 33)) == "small"  # 1023 px²
    assert coco_size_bucket((0, 0, 32, 32)) == "medium"
    assert coco_size_bucket((10, 10, 106, 106)) == "medium"  # 96², not above it
    assert coco_size_bucket((0, 0, 96, 97)) == "large"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"size": 32},
        {"digits": (0, 3)},
        {"digits": (4, 2)},
        {"digit_px": (12, 400)},
        {"max_iou": 1.0},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(InvalidInput):
        digits_on_photos(1, **kwargs)
    with pytest.raises(InvalidInput):  # at the call, not at the first image
        iter_digits_on_photos(1, **kwargs)

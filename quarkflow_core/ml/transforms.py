"""Named transform presets. The eval preset is a plain dict stored in every artifact's manifest
so that serving preprocesses exactly as evaluation did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, ImageOps
from PIL import Image as PILImage

from quarkflow_core.errors import InvalidInput

_STRIP_PIXELS = 1 << 20  # pixels per strip of rows in the conversions below


def _strips(img: PILImage.Image):
    """(top row, crop) pairs covering ``img`` in strips of about ``_STRIP_PIXELS`` pixels."""
    width, height = img.size
    step = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, step):
        yield top, img.crop((0, top, width, min(height, top + step)))


def _rescale_to_l(img: PILImage.Image, mode: str) -> PILImage.Image:
    """16/32-bit greyscale -> "L", rescaled (not clipped). Works strip by strip: a float64 copy
    of the whole frame would cost 8 bytes a pixel (several times over in the arithmetic)."""
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        peaks = []
        for _, strip in _strips(img):
            arr = np.asarray(strip, dtype=np.float64)
            peaks.append((np.abs(arr) if mode == "F" else arr).max())
        top = max(float(np.max(peaks)), 1.0)
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    for row, strip in _strips(img):
        arr = np.asarray(strip, dtype=np.float64)
        out[row : row + arr.shape[0]] = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
    return PILImage.fromarray(out)  # 2-D uint8 -> "L"


def _onto_white(img: PILImage.Image, mode: str) -> PILImage.Image:
    """Transparency composited onto white, strip by strip (per pixel, so the same result as
    on the whole frame, without three more full-size RGBA copies)."""
    grey = mode in ("LA", "La")
    out = PILImage.new("L" if grey else "RGB", img.size)
    for row, strip in _strips(img):
        rgba = strip.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = PILImage.alpha_composite(background, rgba).convert("RGB")
        out.paste(flat.convert("L") if grey else flat, (0, row))
    return out


def canonical_image(img: PILImage.Image) -> PILImage.Image:
    """Any decoded image -> an upright 8-bit "L" or "RGB" image, the same way for training,
    evaluation and serving: first frame of animations, EXIF orientation applied, 16/32-bit
    greyscale rescaled (not clipped), transparency composited onto white, CMYK/YCbCr/LAB/HSV
    converted to RGB, palettes expanded.

    Returns ``img`` itself (not a copy) when it is already canonical, and never changes its
    pixels; conversions that need wide intermediates run in strips of rows, so the peak memory
    stays near the decoded frame plus its 8-bit result (large uploads)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _rescale_to_l(img, mode)
    if mode == "P":
        if "transparency" in img.info:
            return _onto_white(img, "RGBA")
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _onto_white(img, mode)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ...


@dataclass(frozen=True)
class Preprocess:
    """Image -> float tensor (C, H, W): mode, square resize, scale to [0,1], normalize."""

    name: str
    size: int
    channels: int  # 1 = grayscale, 3 = RGB
    mean: tuple[float, ...]
    std: tuple[float, ...]
    invert: bool = False  # MNIST is white-on-black; photos of ink on paper are the opposite
    resample: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        data = dict(data)
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)

    def to_array(self, img: PILImage.Image) -> np.ndarray:
        """uint8 array (H, W, C) at the preset size (before normalisation)."""
        img = canonical_image(img)
        target = "L" if self.channels == 1 else "RGB"
        if img.mode != target:  # converting to the same mode would copy the whole frame
            img = img.convert(target)
        if img.size != (self.size, self.size):
            resample = {
                "bilinear": PILImage.BILINEAR,
                "nearest": PILImage.NEAREST,
                "bicubic": PILImage.BICUBIC,
            }[self.resample]
            img = img.resize((self.size, self.size), resample)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) or (N, C, H, W) uint8 -> normalized float (N, C, H, W)."""
        x = batch_uint8
        if x.shape[-1] == self.channels and x.shape[1] != self.channels:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
        if self.invert:
            x = 1.0 - x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, img: PILImage.Image) -> torch.Tensor:
        arr = torch.from_numpy(self.to_array(img)).unsqueeze(0)
        return self.normalize(arr)[0]


PRESETS: dict[str, Preprocess] = {
    "digits28": Preprocess("digits28", 28, 1, (0.1307,), (0.3081,)),
    "imagenet224": Preprocess("imagenet224", 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "small64": Preprocess("small64", 64, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def eval_preset(name: str, *, size: int | None = None, channels: int | None = None) -> Preprocess:
    try:
        base = PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise InvalidInput(f"unknown preset {name!r}; valid: {valid}") from None
    if size is None and channels is None:
        return base
    ch = channels or base.channels
    mean = base.mean if ch == base.channels else (sum(base.mean) / len(base.mean),) * ch
    std = base.std if ch == base.channels else (sum(base.std) / len(base.std),) * ch
    return Preprocess(base.name, size or base.size, ch, mean, std, base.invert, base.resample)


@dataclass(frozen=True)
class Augment:
    """Train preset: per-sample random affine (rotation, shift, scale) on normalized batches.

    Horizontal flips are off by default: they change the meaning of digits and text."""

    degrees: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, device="cpu").to(dev) * (hi - lo) + lo

        angle = u(-self.degrees, self.degrees) * (torch.pi / 180)
        s = u(*self.scale)
        tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        flip = (
            torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dev)
            if self.hflip
            else torch.ones(n, device=dev)
        )
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
        )
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # fill with the normalized value of "background" (the per-image minimum)
        bg = x.amin(dim=(2, 3), keepdim=True)
        out = F.grid_sample(
            x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out + bg


TRAIN_PRESETS: dict[str, Augment | None] = {
    "none": None,
    "light": Augment(degrees=10, translate=0.1, scale=(0.9, 1.1)),
    "photo": Augment(degrees=15, translate=0.1, scale=(0.8, 1.2), hflip=True),
}


def train_preset(name: str) -> Augment | None:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown augmentation {name!r}; valid: {', '.join(sorted(TRAIN_PRESETS))}"
        ) from None

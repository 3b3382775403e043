"""Named transform presets. The eval preset is a plain dict stored in every artifact's manifest
so that serving preprocesses exactly as evaluation did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL import ImageOps

from quarkflow_core.errors import InvalidInput


def canonical_image(img: PILImage.Image) -> PILImage.Image:
    """Any decoded image -> an upright 8-bit "L" or "RGB" image, the same way for training,
    evaluation and serving: first frame of animations, EXIF orientation applied, 16/32-bit
    greyscale rescaled (not clipped), transparency composited onto white, CMYK/YCbCr/LAB/HSV
    converted to RGB, palettes expanded."""
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
        return PILImage.fromarray(arr.astype(np.uint8))  # 2-D uint8 -> "L"
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
        img = img.convert("L" if self.channels == 1 else "RGB")
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

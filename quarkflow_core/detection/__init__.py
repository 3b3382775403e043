"""Object detection: data sets of boxes on real pixels (issue 18). ``synth`` builds the first
one offline: real MNIST digits pasted onto real photos, with exact boxes."""

from quarkflow_core.detection.synth import (
    PHOTOS,
    DetectionSample,
    coco_size_bucket,
    digits_on_photos,
    draw_boxes,
    encode_png,
    iter_digits_on_photos,
)

__all__ = [
    "PHOTOS",
    "DetectionSample",
    "coco_size_bucket",
    "digits_on_photos",
    "draw_boxes",
    "encode_png",
    "iter_digits_on_photos",
]

"""Exports checked on real images: ONNX (graph + external .data) and TorchScript match eager
within 1e-4 in probability, broken exports raise ExportParityError, backends agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml import export
from quarkflow_core.ml.data import sklearn_digits
from quarkflow_core.ml.models import get_model
from quarkflow_core.ml.prune import prune_structured
from quarkflow_core.ml.transforms import eval_preset

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def digits():
    preset = eval_preset("digits28")
    return preset, sklearn_digits(preset).images[::7][:96]  # 96 real digits, every class


@pytest.fixture(scope="module")
def photos():
    """Real photographs shipped with scikit-image, at 224 px."""
    import skimage.data

    preset = eval_preset("imagenet224")
    arrays = [
        preset.to_array(Image.fromarray(getattr(skimage.data, name)()))
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    return preset, torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def smallcnn():
    torch.manual_seed(0)
    return get_model("smallcnn", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="module")
def smallcnn_onnx(tmp_path_factory, smallcnn, digits):
    preset, images = digits
    path = tmp_path_factory.mktemp("onnx_small") / "model.onnx"
    return export.export_onnx(
        smallcnn, preset.normalize(images[:1]), path, images_uint8=images, preset=preset
    )


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory, photos):
    preset, images = photos
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10).eval()
    path = tmp_path_factory.mktemp("onnx_r18") / "model.onnx"
    paths = export.export_onnx(
        model, preset.normalize(images[:1]), path, images_uint8=images, preset=preset
    )
    return model, paths


def test_onnx_export_writes_graph_and_external_weights(smallcnn, smallcnn_onnx, digits):
    preset, images = digits
    graph_path, data_path = smallcnn_onnx
    assert graph_path.name == "model.onnx" and data_path.name == "model.onnx.data"
    weight_bytes = sum(p.numel() * 4 for p in smallcnn.parameters())
    assert data_path.stat().st_size >= 0.9 * weight_bytes  # the weights live in .data
    assert graph_path.stat().st_size < weight_bytes / 4

    proto = onnx.load(str(graph_path), load_external_data=False)
    assert proto.opset_import[0].version >= 17
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    backend = export.load_backend("onnxruntime", graph_path)
    for n in (1, 7):  # any batch size
        assert backend.logits(preset.normalize(images[:n])).shape == (n, 10)
    assert export.check_parity(smallcnn, graph_path, images, preset) <= 1e-4


def test_resnet18_onnx_parity_on_photos(resnet18_onnx, photos):
    preset, images = photos
    model, (graph_path, data_path) = resnet18_onnx
    assert data_path.stat().st_size > 40_000_000  # ~11M float32 weights
    assert export.check_parity(model, graph_path, images, preset, atol=1e-4) <= 1e-4


def test_onnxruntime_backend_logits_match_eager(resnet18_onnx, photos):
    preset, images = photos
    model, (graph_path, _) = resnet18_onnx
    x = preset.normalize(images)
    ort_backend = export.load_backend("onnxruntime", graph_path, threads=1)
    eager = export.load_backend("eager", model)
    assert isinstance(ort_backend, export.Backend) and ort_backend.name == "onnxruntime"
    np.testing.assert_allclose(ort_backend.logits(x), eager.logits(x), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(
        ort_backend.logits(x.numpy()), eager.logits(x.numpy()), rtol=1e-3, atol=1e-4
    )


def test_perturbed_onnx_weight_raises_parity_error(smallcnn, smallcnn_onnx, digits, tmp_path):
    preset, images = digits
    proto = onnx.load(str(smallcnn_onnx[0]))  # pulls the weights in from model.onnx.data
    target = [t for t in proto.graph.initializer if len(t.dims) == 2][-1]  # a Linear weight
    arr = numpy_helper.to_array(target).copy()
    arr *= 3.0  # sharpen the classifier: probabilities move a lot, shapes stay valid
    target.CopyFrom(numpy_helper.from_array(arr, target.name))
    broken = tmp_path / "broken.onnx"
    onnx.save_model(proto, str(broken))

    with pytest.raises(export.ExportParityError) as err:
        export.check_parity(smallcnn, broken, images, preset)
    assert err.value.code == "export_parity"
    assert err.value.max_abs_diff > 1e-4
    assert "max |Δ prob|" in str(err.value)


def test_parity_against_a_different_model_raises(smallcnn_onnx, digits):
    preset, images = digits
    torch.manual_seed(1)
    other = get_model("smallcnn", num_classes=10, in_channels=1).train()
    with pytest.raises(export.ExportParityError):
        export.check_parity(other, smallcnn_onnx[0], images, preset)
    assert other.training  # compared in eval mode, caller's mode restored


def test_torchscript_export_and_backend(smallcnn, digits, tmp_path):
    preset, images = digits
    path = export.export_torchscript(
        smallcnn,
        preset.normalize(images[:2]),
        tmp_path / "model.pt",
        images_uint8=images,
        preset=preset,
    )
    backend = export.load_backend("torchscript", path)
    x = preset.normalize(images[:5])
    np.testing.assert_allclose(
        backend.logits(x), export.EagerBackend(smallcnn).logits(x), rtol=1e-4, atol=1e-5
    )


def test_pruned_model_exports_with_parity(digits, tmp_path):
    preset, images = digits
    torch.manual_seed(0)
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    pruned = prune_structured(model, preset.normalize(images[:1]), ratio=0.5).eval()
    graph_path, _ = export.export_onnx(
        pruned,
        preset.normalize(images[:1]),
        tmp_path / "pruned.onnx",
        images_uint8=images,
        preset=preset,
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    assert export.check_parity(pruned, session, images, preset) <= 1e-4


def test_unknown_backend_lists_valid_kinds(smallcnn):
    with pytest.raises(InvalidInput) as err:
        export.load_backend("tensorrt", smallcnn)
    for kind in ("eager", "torchscript", "onnxruntime"):
        assert kind in str(err.value)
    with pytest.raises(InvalidInput):
        export.load_backend("eager", "model.onnx")


def test_export_onnx_rejects_bad_arguments(smallcnn, digits, tmp_path):
    preset, images = digits
    x = preset.normalize(images[:1])
    with pytest.raises(InvalidInput, match=r"\.onnx"):
        export.export_onnx(smallcnn, x, tmp_path / "model.bin", images_uint8=images, preset=preset)
    with pytest.raises(InvalidInput, match="opset"):
        export.export_onnx(
            smallcnn, x, tmp_path / "m.onnx", images_uint8=images, preset=preset, opset=13
        )
    with pytest.raises(InvalidInput, match="real image"):
        export.check_parity(smallcnn, tmp_path / "m.onnx", images[:0], preset)

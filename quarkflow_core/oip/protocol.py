"""The Open Inference Protocol's logic, for both transports (REST ``app/api/v2.py``, gRPC
``app/api/oip_grpc.py``); the transports only turn their wire format into an
:class:`InferRequest` and an :class:`InferResponse` back into theirs.

A *model* is a project (its name: ``default``, ``birds``), its one *version* the champion it
serves now (a request naming another version is NotFound). An infer request carries exactly
one input:

- ``image``: BYTES ``[N]``, each element an image file's bytes (PNG, JPEG, ...);
- ``tensor`` (classification only): UINT8 ``[N, C, H, W]`` at the model's preset size, what
  the model's own preprocessing makes of an image (``Predictor.preprocess``). It is encoded
  losslessly as PNG (decoding it gives the same array back), so it takes the same path as an
  uploaded image and is logged like one.

Either way the images go through ``PredictionService.predict_probabilities``: validation,
hostile-file checks, micro-batching, durable logging, metrics and review are those of
``POST /api/v1/predictions``. The outputs: ``label`` (BYTES), ``confidence`` (FP32),
``probabilities`` (FP32 ``[N, classes]``, in the model's class order), ``review`` (BOOL) and
``prediction_id`` (BYTES, for feedback through ``/api/v1``); a detection project answers
``detections`` (BYTES: each image's boxes as JSON) instead of ``probabilities``."""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage

from quarkflow_core import __version__
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.predictor import NoModel
from quarkflow_core.service import PredictionService, Principal

SERVER_NAME = "quarkflow"
# Triton's name for the REST binary tensor extension (Inference-Header-Content-Length)
EXTENSIONS = ("binary_tensor_data",)
IMAGE_INPUT = "image"
TENSOR_INPUT = "tensor"
# the numpy type of each datatype an output has (BYTES: a list of bytes)
DTYPES = {"FP32": np.float32, "BOOL": np.bool_, "UINT8": np.uint8}


# ----------------------------------------------------------------------------- tensors


@dataclass
class InputTensor:
    """An input as sent: ``data`` is the raw bytes (REST binary extension, gRPC
    ``raw_input_contents``) or the list of elements (JSON ``data``, gRPC ``contents``)."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes | list[Any]


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # REST: the output's binary_data parameter


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    binary_output: bool = False  # REST: the request's binary_data_output parameter


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: Any  # a numpy array, or a list of bytes for BYTES
    binary: bool = False  # REST only: sent after the JSON header

    def raw(self) -> bytes:
        """Row-major bytes; BYTES as the protocol's 4-byte little-endian length + bytes."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.values)
        return np.ascontiguousarray(self.values, dtype=DTYPES[self.datatype]).tobytes()

    def json_data(self) -> list[Any]:
        if self.datatype == "BYTES":
            return [v.decode("utf-8") for v in self.values]
        return np.asarray(self.values).ravel().tolist()


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(buf: bytes, *, what: str) -> list[bytes]:
    """A BYTES tensor's raw form -> its elements; InvalidInput when it does not parse."""
    view, out, i = memoryview(buf), [], 0
    while i < len(view):
        if i + 4 > len(view):
            raise InvalidInput(f"{what}: truncated BYTES data (an element's 4-byte length)")
        (n,) = struct.unpack_from("<I", view, i)
        i += 4
        if i + n > len(view):
            raise InvalidInput(f"{what}: truncated BYTES data ({n} bytes declared)")
        out.append(bytes(view[i : i + n]))
        i += n
    return out


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """A project as the protocol's model, and the predictor it serves now (None: none)."""

    project_id: int
    name: str
    predictor: Any

    @property
    def version(self) -> str:
        version = getattr(self.predictor, "version", None)
        return "" if version is None else str(version)

    @property
    def detection(self) -> bool:
        return getattr(self.predictor, "task", "classification") == "detection"


def find_model(service: PredictionService, name: str, version: str = "") -> Model:
    """The project called ``name`` (NotFound, naming the models, if none) and its served
    model; a ``version`` other than the served one is NotFound."""
    pid = service.project_names().get(name)
    if pid is None:  # a project created since the watcher's last listing (names only)
        from sqlalchemy import select

        from quarkflow_core.schema import Project

        with service.session() as s:
            pid = s.scalar(select(Project.id).where(Project.name == name))
        if pid is None:
            models = ", ".join(service.project_names()) or "none"
            raise NotFound(f"no model {name!r} (a model is a project); models: {models}")
    model = Model(pid, name, service.models.ensure(pid))
    if version and version != model.version:
        served = f"version {model.version} is" if model.version else "no version is"
        raise NotFound(f"model {name!r} has no version {version!r}: {served} served")
    return model


def served(service: PredictionService, model: Model) -> Any:
    """The model's predictor, or NoModel (503) when it serves none yet."""
    if model.predictor is None:
        raise NoModel(service.models.no_model_message(model.project_id))
    return model.predictor


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def _tensor_shape(predictor: Any) -> list[int]:
    preset = predictor.preset
    return [-1, preset.channels, preset.size, preset.size]


def model_metadata(service: PredictionService, model: Model) -> dict[str, Any]:
    """The REST form of a model's metadata; gRPC's ``properties`` are its ``parameters``."""
    predictor = served(service, model)
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    if not model.detection:
        inputs.append(
            {"name": TENSOR_INPUT, "datatype": "UINT8", "shape": _tensor_shape(predictor)}
        )
    outputs = [{"name": n, "datatype": d, "shape": s} for n, d, s in _outputs(model, predictor)]
    threshold = predictor.threshold(service.settings.review_threshold)
    parameters = {
        "task": "detection" if model.detection else "classification",
        "classes": json.dumps(list(predictor.classes)),
        "review_threshold": str(round(threshold, 6)),
    }
    if not model.detection:
        parameters["preset"] = predictor.preset.name
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": f"quarkflow_{predictor.backend_name}",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    }


def _outputs(model: Model, predictor: Any) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output the model answers, in answer order."""
    first = (
        [("detections", "BYTES", [-1])]
        if model.detection
        else [("probabilities", "FP32", [-1, len(predictor.classes)])]
    )
    return [
        ("label", "BYTES", [-1]),
        ("confidence", "FP32", [-1]),
        *first,
        ("review", "BOOL", [-1]),
        ("prediction_id", "BYTES", [-1]),
    ]


# ----------------------------------------------------------------------------- inference


def _expected(model: Model) -> str:
    image = f"{IMAGE_INPUT!r} (BYTES [N]: image files)"
    if model.detection:
        return image
    shape = ", ".join(str(d) for d in _tensor_shape(model.predictor)[1:])
    return f"{image} or {TENSOR_INPUT!r} (UINT8 [N, {shape}]: the model's preprocessed input)"


def _count(shape: list[int], what: str) -> int:
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"{what}: the shape {shape} is not a list of sizes")
    return math.prod(shape)


def _image_uploads(tensor: InputTensor, what: str) -> list[tuple[bytes, str | None]]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{what}: datatype {tensor.datatype}; expected BYTES [N] (image files)")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise InvalidInput(f"{what}: shape {tensor.shape}; expected [N] (one image file each)")
    n = _count(tensor.shape, what)
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        elements = deserialize_bytes(bytes(tensor.data), what=what)
    elif all(isinstance(e, str | bytes) for e in tensor.data):
        elements = [e.encode() if isinstance(e, str) else e for e in tensor.data]
    else:
        raise InvalidInput(f"{what}: BYTES elements are strings (or binary data)")
    if len(elements) != n:
        raise InvalidInput(f"{what}: shape {tensor.shape} but {len(elements)} elements were sent")
    return [(element, None) for element in elements]


def _png(array: np.ndarray) -> bytes:
    """A (C, H, W) uint8 array as a PNG that decodes to exactly that array."""
    image = PILImage.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tensor_uploads(
    tensor: InputTensor, model: Model, what: str, max_images: int
) -> list[tuple[bytes, str | None]]:
    shape = _tensor_shape(model.predictor)
    expected = f"expected UINT8 [N, {', '.join(str(d) for d in shape[1:])}] (the preset's size)"
    if tensor.datatype != "UINT8":
        raise InvalidInput(f"{what}: datatype {tensor.datatype}; {expected}")
    if len(tensor.shape) != 4 or list(tensor.shape[1:]) != shape[1:]:
        raise InvalidInput(f"{what}: shape {tensor.shape}; {expected}")
    count = _count(tensor.shape, what)
    if not 1 <= tensor.shape[0] <= max_images:
        raise InvalidInput(
            f"{what}: {tensor.shape[0]} images; send 1 to {max_images} (QF_MAX_BATCH_FILES)",
            code="too_many_files" if tensor.shape[0] > max_images else "no_file",
        )
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        if len(tensor.data) != count:
            raise InvalidInput(f"{what}: {len(tensor.data)} bytes for shape {tensor.shape}")
        array = np.frombuffer(tensor.data, dtype=np.uint8)
    else:
        values = np.asarray(tensor.data).ravel()
        if values.size != count:
            raise InvalidInput(f"{what}: {values.size} values for shape {tensor.shape}")
        if values.size and (
            not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > 255
        ):
            raise InvalidInput(f"{what}: UINT8 values are integers from 0 to 255")
        array = values.astype(np.uint8)
    return [(_png(a), "image/png") for a in array.reshape(tensor.shape)]


def uploads_for(
    request: InferRequest, model: Model, *, max_images: int
) -> list[tuple[bytes, str | None]]:
    """The request's one input as image uploads for ``PredictionService``."""
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"send exactly one input ({len(request.inputs)} were sent): {_expected(model)}"
        )
    tensor = request.inputs[0]
    what = f"input {tensor.name!r}"
    if tensor.name == IMAGE_INPUT:
        return _image_uploads(tensor, what)
    if tensor.name == TENSOR_INPUT and not model.detection:
        return _tensor_uploads(tensor, model, what, max_images)
    raise InvalidInput(f"unknown {what}; this model takes {_expected(model)}")


def infer(
    service: PredictionService, request: InferRequest, *, principal: Principal, source: str
) -> InferResponse:
    """Predict the request's images with the model it names, each logged durably (``source``
    names the transport); the outputs it asked for (all when it named none)."""
    model = find_model(service, request.model_name, request.model_version)
    known = {name: datatype for name, datatype, _ in _outputs(model, served(service, model))}
    for out in request.outputs:  # checked before anything is predicted and logged
        if out.name not in known:
            raise InvalidInput(
                f"unknown output {out.name!r}; this model's outputs: {', '.join(known)}"
            )
    uploads = uploads_for(request, model, max_images=service.settings.max_batch_files)
    predictor, results = service.predict_probabilities(
        uploads,
        principal=principal,
        request_id=request.id or None,
        source=source,
        project_id=model.project_id,
    )
    model = Model(model.project_id, model.name, predictor)  # the one that answered (hot swap)
    values: dict[str, Any] = {
        "label": [r["label"].encode() for r in results],
        "confidence": np.array([r["confidence"] for r in results], dtype=np.float32),
        "review": np.array([bool(r["review"]) for r in results], dtype=np.bool_),
        "prediction_id": [r["id"].encode() for r in results],
    }
    if model.detection:
        keys = ("boxes", "width", "height", "threshold")
        values["detections"] = [json.dumps({k: r.get(k) for k in keys}).encode() for r in results]
    else:
        values["probabilities"] = np.stack([r["probabilities"] for r in results]).astype(np.float32)
    known = {name: datatype for name, datatype, _ in _outputs(model, predictor)}
    wanted = request.outputs or [RequestedOutput(name) for name in known]
    outputs = []
    for out in wanted:
        value = values[out.name]
        shape = list(np.shape(value)) if known[out.name] != "BYTES" else [len(value)]
        binary = request.binary_output if out.binary is None else out.binary
        outputs.append(OutputTensor(out.name, known[out.name], shape, value, binary))
    return InferResponse(model.name, model.version, request.id, outputs)


# ----------------------------------------------------------------------------- REST's form


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{what}: parameters must be a JSON object")
    return params


def _bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _flat(data: Any) -> list[Any]:
    """JSON ``data``, nested row-major or flat, as a flat list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def request_from_json(
    body: bytes, *, header_length: int | None, model_name: str, model_version: str
) -> InferRequest:
    """A REST infer request: JSON, or (binary tensor extension) a JSON header of
    ``header_length`` bytes followed by the inputs whose ``binary_data_size`` says so, in
    input order."""
    header = body if header_length is None else body[:header_length]
    binary = b"" if header_length is None else body[header_length:]
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} does not fit a body of "
            f"{len(body)} bytes"
        )
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"the request is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput('the request must be a JSON object with an "inputs" list')
    if not isinstance(doc.get("outputs") or [], list):
        raise InvalidInput('"outputs" must be a list')
    params = _params(doc, "the request")
    inputs, offset = [], 0
    for i, item in enumerate(doc["inputs"]):
        if not isinstance(item, dict) or not {"name", "datatype", "shape"} <= item.keys():
            raise InvalidInput(f"input {i}: needs name, datatype and shape")
        if not isinstance(item["shape"], list):
            raise InvalidInput(f"input {i}: shape must be a list")
        size = _params(item, f"input {i}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {item['name']!r}: binary_data_size {size} is past the "
                    f"{len(binary)} bytes after the JSON header"
                )
            data: bytes | list[Any] = binary[offset : offset + size]
            offset += size
        elif "data" in item:
            try:
                data = _flat(item["data"])
            except RecursionError:
                raise InvalidInput(f"input {i}: data nested too deeply") from None
        else:
            raise InvalidInput(f"input {item['name']!r}: no data (nor binary_data_size)")
        inputs.append(InputTensor(str(item["name"]), str(item["datatype"]), item["shape"], data))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes after the inputs' binary data")
    outputs = []
    for item in doc.get("outputs") or []:
        if not isinstance(item, dict) or "name" not in item:
            raise InvalidInput("each requested output needs a name")
        flag = _params(item, f"output {item['name']!r}").get("binary_data")
        outputs.append(RequestedOutput(str(item["name"]), None if flag is None else _bool(flag)))
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=str(doc.get("id") or ""),
        inputs=inputs,
        outputs=outputs,
        binary_output=_bool(params.get("binary_data_output", False)),
    )


def response_to_json(response: InferResponse) -> tuple[bytes, bytes]:
    """(JSON header, binary data after it: empty when no output is binary)."""
    outputs, blobs = [], []
    for out in response.outputs:
        item: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            raw = out.raw()
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = out.json_data()
        outputs.append(item)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        doc["id"] = response.id
    return json.dumps(doc).encode(), b"".join(blobs)

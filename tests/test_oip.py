"""The Open Inference Protocol (KServe v2) against a real `quarkflow serve` on Postgres + fake
GCS, driven by a client no one here wrote: tritonclient's gRPC and HTTP clients (from
.venv-clients, through tests/helpers/oip_client.py). They get the same labels and
probabilities as `POST /api/v1/predictions` for the same images (sent as image files and as
the preprocessed tensor), every answer is logged, and bad calls get the protocol's errors
without being logged."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from helpers.serving import ServerProcess, deploy, free_port, wait_until
from helpers.storage import make_gcs
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import InvalidInput
from quarkflow_core.oip import inference_pb2 as pb
from quarkflow_core.oip import inference_pb2_grpc as pb_grpc
from quarkflow_core.oip import protocol
from quarkflow_core.predictor import Predictor
from quarkflow_core.schema import Image, Prediction

ROOT = Path(__file__).resolve().parents[1]
OIP = ROOT / "quarkflow_core" / "oip"
CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
CLIENT = Path(__file__).parent / "helpers" / "oip_client.py"
STUBS = (
    "inference_pb2.py",
    "inference_pb2.pyi",
    "inference_pb2_grpc.py",
)


@pytest.mark.unit
def test_committed_stubs_are_what_the_proto_generates(tmp_path):
    """quarkflow_core/oip/__init__.py's command, run into a temporary folder, gives exactly
    the committed stubs."""
    (tmp_path / "quarkflow_core" / "oip").mkdir(parents=True)
    proto = "quarkflow_core/oip/inference.proto"
    shutil.copy(ROOT / proto, tmp_path / proto)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", proto],
        cwd=tmp_path,
        check=True,
    )  # fmt: skip
    for name in STUBS:
        generated = (tmp_path / "quarkflow_core" / "oip" / name).read_text()
        assert generated == (OIP / name).read_text(), f"{name}: regenerate it (see __init__.py)"


def _binary_request(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


@pytest.mark.unit
def test_rest_requests_parse_as_tritonclient_sends_them():
    """The binary tensor extension (JSON header, then each binary input in input order), the
    JSON form, and requests that cannot be parsed: InvalidInput (400), never a 500."""
    images = [b"\x89PNG one", b"two"]
    raw = protocol.serialize_bytes(images)
    assert protocol.deserialize_bytes(raw, what="x") == images
    header = {
        "id": "r1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "review"}],
        "parameters": {"binary_data_output": False},
    }  # fmt: skip
    body, length = _binary_request(header, raw)
    req = protocol.request_from_json(body, header_length=length, model_name="m", model_version="")
    assert (req.id, req.inputs[0].data, req.binary_output) == ("r1", raw, False)
    assert [(o.name, o.binary) for o in req.outputs] == [("label", True), ("review", None)]
    assert protocol._image_uploads(req.inputs[0], "x") == [(b"\x89PNG one", None), (b"two", None)]
    plain = {"inputs": [{"name": "tensor", "datatype": "UINT8", "shape": [1, 2], "data": [[1, 2]]}]}
    req = protocol.request_from_json(
        json.dumps(plain).encode(), header_length=None, model_name="m", model_version="3"
    )
    assert (req.inputs[0].data, req.model_version) == ([1, 2], "3")

    bad = [
        (b"not json", None, "not JSON"),
        (*_binary_request(header, raw[:-1]), "binary_data_size"),
        (*_binary_request(header, raw, b"x"), "1 bytes after"),
        (body, len(body) + 5, "does not fit"),
        (json.dumps({"inputs": [], "parameters": 3}).encode(), None, "JSON object"),
        (json.dumps({"inputs": [], "outputs": 3}).encode(), None, "must be a list"),
        (json.dumps({"inputs": [{"name": "image"}]}).encode(), None, "needs name"),
        (json.dumps({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1]}]}).encode(),
         None, "no data"),
        (b"[" * 100_000, None, "not JSON"),
    ]  # fmt: skip
    for data, length, words in bad:
        with pytest.raises(InvalidInput, match=words):
            protocol.request_from_json(data, header_length=length, model_name="m", model_version="")
    for shape, data, words in [
        ([1], [7], "strings"),
        ([2], ["a"], "1 elements"),
        ([1, 2], ["a", "b"], "expected \\[N\\]"),
    ]:
        tensor = protocol.InputTensor("image", "BYTES", shape, data)
        with pytest.raises(InvalidInput, match=words):
            protocol._image_uploads(tensor, "x")
    with pytest.raises(InvalidInput, match="truncated"):
        protocol.deserialize_bytes(raw[:-1], what="x")


@pytest.mark.unit
def test_answers_are_binary_or_json_as_asked_and_grpc_reads_typed_contents():
    from app.api.oip_grpc import infer_request, infer_response

    answer = protocol.InferResponse(
        "default",
        "2",
        "r1",
        [
            protocol.OutputTensor("label", "BYTES", [2], [b"3", b"7"], binary=True),
            protocol.OutputTensor("confidence", "FP32", [2], np.array([0.5, 0.25], np.float32)),
        ],
    )
    head, binary = protocol.response_to_json(answer)
    doc = json.loads(head)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": len(binary)}
    assert protocol.deserialize_bytes(binary, what="x") == [b"3", b"7"]
    assert doc["outputs"][1]["data"] == [0.5, 0.25] and doc["id"] == "r1"
    msg = infer_response(answer)
    assert np.frombuffer(msg.raw_output_contents[1], np.float32).tolist() == [0.5, 0.25]

    request = pb.ModelInferRequest(model_name="default", id="g")
    tensor = request.inputs.add(name="tensor", datatype="UINT8", shape=[1, 2])
    tensor.contents.uint_contents.extend([5, 250])
    parsed = infer_request(request)
    assert (parsed.inputs[0].data, parsed.inputs[0].shape, parsed.id) == ([5, 250], [1, 2], "g")
    request.raw_input_contents.extend([b"\x05\xfa", b"extra"])
    with pytest.raises(InvalidInput, match="2 tensors for 1 inputs"):
        infer_request(request)


def _client_python() -> str:
    if not CLIENT_PYTHON.exists():
        pytest.fail(
            f"{CLIENT_PYTHON} is missing: tritonclient lives in its own venv; `make install` "
            "(or `make test`) builds it from requirements-clients.txt"
        )
    return str(CLIENT_PYTHON)


def _readme_example(folder: Path, png: bytes, *, token: str, port: int) -> str:
    """README.md's tritonclient block, run as written but for the token and the port, in a
    folder holding its digit.png; what it printed."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import numpy as np\nimport tritonclient.*?)```", text, re.S)
    assert code, "README.md: the tritonclient example is gone"
    (folder / "digit.png").write_bytes(png)
    source = code.group(1).replace('TOKEN = "..."', f"TOKEN = {token!r}")
    source = source.replace("127.0.0.1:8001", f"127.0.0.1:{port}")
    out = subprocess.run(
        [_client_python(), "-c", source], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _clients(job: dict) -> list:
    out = subprocess.run(
        [_client_python(), str(CLIENT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.integration
@pytest.mark.slow
def test_tritonclient_grpc_and_http_answer_as_the_rest_api(
    pg_factory, gcs_host, tmp_path, trained_artifacts
):
    bucket = make_gcs(gcs_host).bucket_name
    champion = trained_artifacts["strong"]
    dep = deploy(
        pg_factory.create(), f"gs://{bucket}/qf", tmp_path / "qf", champion, emulator_host=gcs_host
    )
    grpc_port = free_port()
    env = dep.env(QF_GRPC_PORT=str(grpc_port), QF_ANONYMOUS_DEMO="false")
    server = ServerProcess(env, free_port(), tmp_path / "server.log")

    pngs, _ = demo_pngs(8)
    files = []
    for i, data in enumerate(pngs):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(data)
        files.append(str(path))
    group_a, group_b = files[:4], files[4:]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(pngs[0][:40] + b"\x00" * 200)  # a PNG header, then garbage
    predictor = Predictor.from_artifact(champion, version=1)
    tensor = np.stack([predictor.preprocess(d) for d in pngs])  # uint8 [8, 1, 28, 28]
    assert tensor.dtype == np.uint8 and tensor.shape == (8, 1, 28, 28)
    np.save(tmp_path / "tensor.npy", tensor)
    np.save(tmp_path / "fp32.npy", tensor.astype(np.float32))
    np.save(tmp_path / "wrong.npy", tensor[:, :, :14, :14].copy())

    steps = {  # name -> step; each ok step's answer is checked below
        "grpc_live": {"proto": "grpc", "op": "live"},
        "grpc_ready": {"proto": "grpc", "op": "ready"},
        "http_live": {"proto": "http", "op": "live"},
        "http_ready": {"proto": "http", "op": "ready"},
        "grpc_server": {"proto": "grpc", "op": "server_metadata"},
        "http_server": {"proto": "http", "op": "server_metadata"},
        "grpc_model_ready": {"proto": "grpc", "op": "model_ready", "model": "default"},
        "http_model_ready": {"proto": "http", "op": "model_ready", "model": "default"},
        "grpc_meta": {"proto": "grpc", "op": "model_metadata", "model": "default"},
        "http_meta": {"proto": "http", "op": "model_metadata", "model": "default", "version": "1"},
        # first seen through gRPC (A) and REST (B): their images' source names the protocol
        "grpc_a": {"proto": "grpc", "op": "infer", "model": "default", "files": group_a,
                   "id": "grpc-a"},
        "http_b": {"proto": "http", "op": "infer", "model": "default", "files": group_b,
                   "id": "http-b"},
        "grpc_b": {"proto": "grpc", "op": "infer", "model": "default", "files": group_b,
                   "version": "1", "id": "grpc-b"},
        "http_a": {"proto": "http", "op": "infer", "model": "default", "files": group_a,
                   "id": "http-a"},
        "grpc_tensor": {"proto": "grpc", "op": "infer", "model": "default", "id": "grpc-t",
                        "tensor": str(tmp_path / "tensor.npy"), "datatype": "UINT8"},
        "http_tensor": {"proto": "http", "op": "infer", "model": "default", "id": "http-t",
                        "tensor": str(tmp_path / "tensor.npy"), "datatype": "UINT8"},
        "http_tensor_json": {"proto": "http", "op": "infer", "model": "default", "json": True,
                             "tensor": str(tmp_path / "tensor.npy"), "datatype": "UINT8",
                             "id": "http-j"},
        # refused, and nothing logged
        "grpc_no_token": {"proto": "grpc", "op": "infer", "model": "default", "files": group_a,
                          "token": None},
        "http_no_token": {"proto": "http", "op": "infer", "model": "default", "files": group_a,
                          "token": None},
        "grpc_bad_token": {"proto": "grpc", "op": "model_metadata", "model": "default",
                           "token": "not-a-token"},
        "grpc_corrupt": {"proto": "grpc", "op": "infer", "model": "default",
                         "files": [group_a[0], str(corrupt)]},
        "http_corrupt": {"proto": "http", "op": "infer", "model": "default",
                         "files": [str(corrupt)]},
        "grpc_unknown": {"proto": "grpc", "op": "infer", "model": "birds", "files": group_a},
        "http_unknown": {"proto": "http", "op": "infer", "model": "birds", "files": group_a},
        "grpc_old_version": {"proto": "grpc", "op": "infer", "model": "default",
                             "version": "7", "files": group_a},
        "http_old_version": {"proto": "http", "op": "infer", "model": "default",
                             "version": "7", "files": group_a},
        "http_unknown_ready": {"proto": "http", "op": "model_ready", "model": "birds"},
        "grpc_fp32": {"proto": "grpc", "op": "infer", "model": "default",
                      "tensor": str(tmp_path / "fp32.npy"), "datatype": "FP32"},
        "http_wrong_shape": {"proto": "http", "op": "infer", "model": "default",
                             "tensor": str(tmp_path / "wrong.npy"), "datatype": "UINT8"},
        # still answering
        "grpc_after": {"proto": "grpc", "op": "infer", "model": "default", "files": group_a[:1],
                       "id": "grpc-after"},
        "http_after": {"proto": "http", "op": "infer", "model": "default", "files": group_a[:1],
                       "id": "http-after"},
    }  # fmt: skip
    try:
        server.wait_live()
        wait_until(lambda: httpx.get(server.url + "/readyz").status_code == 200, what="ready")
        job = {
            "grpc": f"127.0.0.1:{grpc_port}",
            "http": f"127.0.0.1:{server.port}",
            "token": dep.tokens["expert"],
            "steps": list(steps.values()),
        }
        got = dict(zip(steps, _clients(job), strict=True))
        readme = _readme_example(tmp_path, pngs[0], token=dep.tokens["expert"], port=grpc_port)
        rest = []  # the same images through the REST API, after: their images already exist
        for data in pngs:
            r = httpx.post(
                server.url + "/api/v1/predictions",
                files={"file": ("d.png", data, "image/png")},
                headers=dep.auth("expert"),
                timeout=30,
            )
            assert r.status_code == 200, r.text
            rest.append(r.json())
        # tritonclient's gRPC client parses with Triton's own proto, which has no properties
        # field: read them with the published proto's stubs
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            meta = stub.ModelMetadata(
                pb.ModelMetadataRequest(name="default"),
                metadata=[("authorization", f"Bearer {dep.tokens['expert']}")],
            )
            properties = dict(meta.properties)
        assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()

    # health and metadata
    for name in ("grpc_live", "grpc_ready", "http_live", "http_ready"):
        assert got[name] is True, (name, got[name])
    assert got["grpc_model_ready"] is True and got["http_model_ready"] is True
    assert got["http_unknown_ready"] is False
    for name in ("grpc_server", "http_server"):
        assert got[name]["name"] == "quarkflow" and "binary_tensor_data" in got[name]["extensions"]
    grpc_meta, http_meta = got["grpc_meta"], got["http_meta"]
    assert http_meta["name"] == grpc_meta["name"] == "default"
    assert http_meta["versions"] == grpc_meta["versions"] == ["1"]
    assert http_meta["platform"] == grpc_meta["platform"] == f"quarkflow_{predictor.backend_name}"
    classes = json.loads(http_meta["parameters"]["classes"])
    assert classes == json.loads(properties["classes"]) == predictor.classes
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in http_meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1]), "tensor": ("UINT8", [-1, 1, 28, 28])}
    assert {t["name"]: [int(d) for d in t["shape"]] for t in grpc_meta["inputs"]} == {
        "image": [-1],
        "tensor": [-1, 1, 28, 28],
    }  # (as JSON, protobuf writes int64 as strings)
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in http_meta["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, len(classes)])
    assert set(outputs) == {"label", "confidence", "probabilities", "review", "prediction_id"}

    # the same answers as the REST API, image by image
    def check(answer: dict, indices: range | list[int], request_id: str) -> None:
        assert answer["model_name"] == "default" and answer["model_version"] == "1"
        assert answer["id"] == request_id
        out = answer["outputs"]
        assert set(out) == {"label", "confidence", "probabilities", "review", "prediction_id"}
        for row, i in enumerate(indices):
            want = rest[i]
            assert out["label"][row] == want["label"]
            assert out["confidence"][row] == pytest.approx(want["confidence"], abs=1e-5)
            assert out["review"][row] == want["review"]
            probs = out["probabilities"][row]
            assert len(probs) == len(classes) and sum(probs) == pytest.approx(1.0, abs=1e-4)
            for top in want["topk"]:
                assert probs[classes.index(top["label"])] == pytest.approx(
                    top["confidence"], abs=1e-5
                )

    a, b, everything = range(4), range(4, 8), range(8)
    check(got["grpc_a"], a, "grpc-a")
    check(got["http_a"], a, "http-a")
    check(got["grpc_b"], b, "grpc-b")
    check(got["http_b"], b, "http-b")
    check(got["grpc_tensor"], everything, "grpc-t")
    check(got["http_tensor"], everything, "http-t")
    check(got["http_tensor_json"], everything, "http-j")
    check(got["grpc_after"], [0], "grpc-after")
    check(got["http_after"], [0], "http-after")

    # the protocol's errors, with what went wrong in words
    def error(name: str, status: str, words: str) -> None:
        assert "error" in got[name], (name, got[name])
        assert got[name]["status"] == status, (name, got[name])
        assert words in got[name]["error"], (name, got[name])

    error("grpc_no_token", "StatusCode.UNAUTHENTICATED", "authentication required")
    error("http_no_token", "401", "authentication required")
    error("grpc_bad_token", "StatusCode.UNAUTHENTICATED", "")
    error("grpc_corrupt", "StatusCode.INVALID_ARGUMENT", "image 2 of 2")
    error("http_corrupt", "400", "")
    error("grpc_unknown", "StatusCode.NOT_FOUND", "no model 'birds'")
    error("http_unknown", "404", "no model 'birds'")
    error("grpc_old_version", "StatusCode.NOT_FOUND", "version 1 is served")
    error("http_old_version", "404", "version 1 is served")
    error("grpc_fp32", "StatusCode.INVALID_ARGUMENT", "expected UINT8 [N, 1, 28, 28]")
    error("http_wrong_shape", "400", "expected UINT8 [N, 1, 28, 28]")
    assert "Traceback" not in log, log[-3000:]

    # every answer logged durably (rows, images in storage), the refused calls not at all
    answered = {
        name: got[name]["outputs"]["prediction_id"]
        for name, step in steps.items()
        if step["op"] == "infer" and "error" not in got[name]
    }
    ids = {pid for pids in answered.values() for pid in pids} | {p["id"] for p in rest}
    assert len(ids) == sum(len(p) for p in answered.values()) + len(rest) == 4 * 4 + 8 * 3 + 2 + 8
    # the README's example printed the label the REST API gives, and its prediction is logged
    assert readme.startswith(f"[b'{rest[0]['label']}'] ["), readme
    ids.add(re.search(r"\[b'([0-9a-f-]{36})'\]", readme).group(1))
    engine = dep.engine()

    def logged() -> list[Prediction]:
        with Session(engine) as s:
            rows = s.scalars(select(Prediction)).all()
        return rows if {r.id for r in rows} >= ids else []

    rows = wait_until(logged, timeout=60, every=0.5, what="every prediction to be logged")
    assert {r.id for r in rows} == ids  # nothing else: the refused calls logged nothing
    by_id = {r.id: r for r in rows}
    for name, pids in answered.items():
        assert {by_id[p].request_id for p in pids} == {steps[name]["id"]}
    with Session(engine) as s:
        images = s.scalars(select(Image)).all()
    engine.dispose()
    sources = {img.sha256: img.source for img in images}
    assert (
        len(images) == len({r.image_id for r in rows}) == 8 + 8
    )  # the files, and the tensor's 8 PNGs
    for i, data in enumerate(pngs):
        assert sources[hashlib.sha256(data).hexdigest()] == ("oip-grpc" if i < 4 else "oip-rest")
    assert sorted(sources.values()).count("oip-grpc") == 4 + 8  # group A and the tensor's
    storage = dep.storage()
    assert all(storage.exists(img.storage_key) for img in images)

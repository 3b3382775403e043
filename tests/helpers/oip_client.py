"""Drives tritonclient (gRPC and HTTP) against a Quarkflow server, for tests/test_oip.py.

Runs with .venv-clients/bin/python (tritonclient's pins conflict with ours; `make install`
builds that venv from requirements-clients.txt), so it imports nothing from Quarkflow. Reads a
job as JSON on stdin:

    {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000", "token": "...", "steps": [
        {"proto": "grpc", "op": "infer", "model": "default", "files": ["a.png"]}, ...]}

and prints one JSON list, a result per step: the call's answer, or
``{"error": message, "status": status}`` when tritonclient raised. A step's ``token`` (null:
no authorization header) replaces the job's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _infer(client: Any, module: Any, step: dict, headers: dict | None) -> dict:
    as_json = step.get("json", False)  # HTTP: JSON data instead of the binary extension
    if "files" in step:
        data = np.array([Path(p).read_bytes() for p in step["files"]], dtype=np.object_)
        tensor = module.InferInput("image", [len(data)], "BYTES")
    else:
        data = np.load(step["tensor"])
        tensor = module.InferInput(step.get("input", "tensor"), list(data.shape), step["datatype"])
    if module is httpclient:
        tensor.set_data_from_numpy(data, binary_data=not as_json)
    else:
        tensor.set_data_from_numpy(data)
    outputs = None
    if step.get("outputs") or as_json:
        names = step.get("outputs") or [
            "label",
            "confidence",
            "probabilities",
            "review",
            "prediction_id",
        ]
        outputs = [
            module.InferRequestedOutput(n, binary_data=not as_json)
            if module is httpclient
            else module.InferRequestedOutput(n)
            for n in names
        ]
    result = client.infer(
        step["model"],
        [tensor],
        model_version=step.get("version", ""),
        outputs=outputs,
        request_id=step.get("id", ""),
        headers=headers,
    )
    response = result.get_response(as_json=True) if module is grpcclient else result.get_response()
    names = [o["name"] for o in response["outputs"]]
    return {
        "model_name": response["model_name"],
        "model_version": response["model_version"],
        "id": response.get("id", ""),
        "outputs": {n: _plain(result.as_numpy(n)) for n in names},
    }


def run(step: dict, job: dict, clients: dict) -> Any:
    proto = step["proto"]
    client, module = clients[proto], grpcclient if proto == "grpc" else httpclient
    token = step["token"] if "token" in step else job.get("token")
    headers = {"authorization": f"Bearer {token}"} if token else None
    op = step["op"]
    extra = {"as_json": True} if proto == "grpc" else {}
    if op == "live":
        return client.is_server_live(headers=headers)
    if op == "ready":
        return client.is_server_ready(headers=headers)
    if op == "model_ready":
        return client.is_model_ready(step["model"], step.get("version", ""), headers=headers)
    if op == "server_metadata":
        return client.get_server_metadata(headers=headers, **extra)
    if op == "model_metadata":
        return client.get_model_metadata(
            step["model"], step.get("version", ""), headers=headers, **extra
        )
    if op == "infer":
        return _infer(client, module, step, headers)
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    job = json.load(sys.stdin)
    clients = {
        "grpc": grpcclient.InferenceServerClient(job["grpc"]),
        "http": httpclient.InferenceServerClient(job["http"], network_timeout=60),
    }
    results = []
    for step in job["steps"]:
        try:
            results.append(run(step, job, clients))
        except InferenceServerException as exc:
            results.append({"error": exc.message(), "status": exc.status()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()

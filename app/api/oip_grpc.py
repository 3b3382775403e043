"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService`` from the
protocol's published ``.proto``, what tritonclient's gRPC client speaks), run by the API's
lifespan in the same process, on ``QF_GRPC_PORT`` (0: off), with the same service as the REST
routes (``quarkflow_core.oip``). Callers authenticate with the metadata
``authorization: Bearer <token>``, as REST does with the header; ServerLive, ServerReady and
ServerMetadata are open, like ``/v2/health/...``.

Core errors become status codes through the REST edge's statuses (``v2.oip_status``): 400
INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE. A message larger than ``QF_MAX_BATCH_FILES`` images of
``QF_MAX_UPLOAD_BYTES`` (plus ``QF_MAX_JSON_BYTES``) is refused by gRPC itself with
RESOURCE_EXHAUSTED."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from sqlalchemy.exc import OperationalError

from app.api.deps import principal_from
from app.api.v2 import oip_status
from quarkflow_core.config import Settings
from quarkflow_core.errors import ConfigError, InvalidInput, QuarkflowError
from quarkflow_core.oip import inference_pb2 as pb
from quarkflow_core.oip import inference_pb2_grpc as pb_grpc
from quarkflow_core.oip import protocol
from quarkflow_core.service import PredictionService, Principal

log = logging.getLogger("quarkflow.api")
SOURCE = "oip-grpc"  # the logged images' source
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}
# which InferTensorContents field holds a datatype's elements when raw contents are not used
CONTENTS = {
    "BYTES": "bytes_contents",
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _errors_as_status(method: Callable) -> Callable:
    """Core errors -> the protocol's status codes, the detail as the message."""

    @functools.wraps(method)
    def rpc(self: InferenceServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except QuarkflowError as exc:
            code = CODES.get(oip_status(exc.code), grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, exc.detail)
        except OperationalError:
            detail = "the database is unreachable or busy; retry shortly"
            context.abort(grpc.StatusCode.UNAVAILABLE, detail)
        except Exception as exc:
            log.exception("unhandled error in gRPC %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"unexpected {type(exc).__name__}")

    return rpc


def infer_request(msg: pb.ModelInferRequest) -> protocol.InferRequest:
    """A ModelInferRequest as the protocol's request: each input's elements from
    ``raw_input_contents`` (what tritonclient sends) or from its typed ``contents``."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(msg.inputs)} inputs"
        )
    inputs = []
    for i, tensor in enumerate(msg.inputs):
        if raw:
            data: bytes | list[Any] = raw[i]
        else:
            data = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, "bytes_contents")))
        inputs.append(protocol.InputTensor(tensor.name, tensor.datatype, list(tensor.shape), data))
    return protocol.InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=[protocol.RequestedOutput(out.name) for out in msg.outputs],
    )


def infer_response(answer: protocol.InferResponse) -> pb.ModelInferResponse:
    """The answer with every output in ``raw_output_contents``, as Triton answers."""
    tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=answer.model_name,
        model_version=answer.model_version,
        id=answer.id,
        outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in answer.outputs],
        raw_output_contents=[o.raw() for o in answer.outputs],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: PredictionService, *, anonymous: bool) -> None:
        self.service = service
        self.anonymous = anonymous

    def _who(self, context: grpc.ServicerContext) -> Principal:
        metadata = {k.lower(): v for k, v in context.invocation_metadata()}
        header = metadata.get("authorization")
        return principal_from(
            header if isinstance(header, str) else None,
            service=self.service,
            anonymous=self.anonymous,
        )

    @_errors_as_status
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_errors_as_status
    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.service.readiness()["ready"]))

    @_errors_as_status
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**protocol.server_metadata())

    @_errors_as_status
    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._who(context)
        model = protocol.find_model(self.service, request.name, request.version)
        return pb.ModelReadyResponse(ready=model.predictor is not None)

    @_errors_as_status
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._who(context)
        model = protocol.find_model(self.service, request.name, request.version)
        meta = protocol.model_metadata(self.service, model)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
            properties=meta["parameters"],
        )

    @_errors_as_status
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        who = self._who(context)
        answer = protocol.infer(self.service, infer_request(request), principal=who, source=SOURCE)
        return infer_response(answer)


def message_limit(settings: Settings) -> int:
    """The largest gRPC message: a full batch of the largest images, plus room for the rest."""
    return settings.max_batch_files * (settings.max_upload_bytes + 4) + settings.max_json_bytes


def start_grpc(
    service: PredictionService,
    settings: Settings,
    *,
    host: str,
    anonymous: bool,
    reuse_port: bool = False,
) -> grpc.Server:
    """The gRPC service, started on ``host:QF_GRPC_PORT``. A port already taken is a
    ConfigError (``reuse_port``, for several workers of ``uvicorn app.main:app``, shares it)."""
    limit = message_limit(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max(8, settings.serving_max_batch), thread_name_prefix="qf-grpc"
        ),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(service, anonymous=anonymous), server
    )
    address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound, reason = 0, str(exc)
    else:
        reason = "the port is taken"
    if not bound:
        raise ConfigError(
            f"cannot serve gRPC on {address} ({reason}): set QF_GRPC_PORT (or "
            "`quarkflow serve --grpc-port`) to a free port, or 0 to turn gRPC off"
        )
    server.start()
    log.info("Open Inference Protocol gRPC on %s", address)
    return server


def stop_grpc(server: grpc.Server, grace_s: float = 5.0) -> None:
    """Refuse new calls, let the running ones finish (up to ``grace_s``), then stop."""
    server.stop(grace_s).wait(grace_s + 5)

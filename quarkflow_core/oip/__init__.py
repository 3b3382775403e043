"""The Open Inference Protocol (KServe v2: what Triton, KServe, Seldon MLServer and TorchServe
speak), served next to the REST API by the same ``PredictionService``.

- ``inference.proto``: the protocol's gRPC API, written for Quarkflow from the protocol's
  specification: package ``inference``, service ``GRPCInferenceService``, and the published
  ``open_inference_grpc.proto``'s message and field names and numbers, so every client of the
  protocol speaks to it (``tests/test_oip.py`` drives it with tritonclient); only the RPCs
  Quarkflow serves (health, metadata, inference) are declared;
- ``inference_pb2.py``, ``inference_pb2.pyi``, ``inference_pb2_grpc.py``: generated from it,
  committed, never edited by hand
  (``tests/test_oip.py`` regenerates them into a temporary folder and compares). From the
  repository root, with grpcio-tools 1.85.4 (requirements-dev.txt)::

      .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \\
          --grpc_python_out=. quarkflow_core/oip/inference.proto

- ``protocol``: the protocol's logic, shared by both transports (REST ``app/api/v2.py``,
  gRPC ``app/api/oip_grpc.py``): which model a name means, its metadata, and an infer request
  turned into predictions (through ``PredictionService``, so validation, micro-batching,
  durable logging, metrics and review are those of ``POST /api/v1/predictions``) and back
  into output tensors. No transport is imported here.
"""

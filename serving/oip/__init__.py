"""The Open Inference Protocol (KServe v2, which Triton, KServe, Seldon MLServer and their
clients speak) for this service: `protocol` (the model's metadata and the one inference path),
`http` (its /v2 REST endpoints on the service's FastAPI app), `grpc_server` (its gRPC service
and the standard health service, on their own port), `tensors` (typed tensors on the wire).

grpc_predict_v2.proto is KServe's, vendored unchanged (Apache-2.0; its header says whence);
grpc_predict_v2_pb2*.py(i) are generated from it, from the repository root, with the
grpcio-tools that matches the serving extra's floors (its gencode needs protobuf >= 6.31.1):

    pip install grpcio-tools==1.75.1
    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        serving/oip/grpc_predict_v2.proto

tests/serving/test_grpc_stubs.py regenerates them with the installed grpcio-tools and checks
they describe the same service, and that Triton's client protocol matches it field for field.
The stubs register the `inference` protobuf package in the process's default descriptor pool,
as tritonclient.grpc's do: one process cannot import both (serving.app imports the stubs only
when it starts the gRPC server).
"""

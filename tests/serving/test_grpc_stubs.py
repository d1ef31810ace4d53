"""serving/oip's generated gRPC stubs: they are what the vendored grpc_predict_v2.proto
generates (regenerated here with the installed grpcio-tools, compared as descriptors: the
text differs between grpcio-tools versions, the protocol must not), they need no newer
protobuf or grpcio than the serving extra's floors, and Triton's own client protocol
(tritonclient.grpc's grpc_service.proto) agrees with them field for field on every call the
service implements, which is why Triton's clients can call it. The stubs are read as source, never imported: importing them
and tritonclient.grpc into one process is refused by protobuf (both define `inference.*`)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.helpers import REPO

pytest.importorskip("grpc_tools.protoc")

OIP = REPO / "serving" / "oip"
PROTO = "serving/oip/grpc_predict_v2.proto"
SERVICE = "inference.GRPCInferenceService"


def serialized_descriptor(pb2: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated _pb2.py registers (the bytes it hands the pool)."""
    for node in ast.walk(ast.parse(pb2.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError(f"no AddSerializedFile in {pb2}")


def methods(pb2_grpc: Path) -> list[tuple[str, str, str]]:
    """(method, request type, response type) of each RPC the generated servicer registers."""
    text = pb2_grpc.read_text()
    found = re.findall(
        r"'(\w+)': grpc\.unary_unary_rpc_method_handler\(\s*servicer\.\w+,\s*"
        r"request_deserializer=\w+\.(\w+)\.FromString,\s*response_serializer=\w+\.(\w+)\.SerializeToString",
        text,
    )
    assert found, pb2_grpc
    return found


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("protoc")
    (root / "serving" / "oip").mkdir(parents=True)
    shutil.copy(REPO / PROTO, root / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            PROTO,
        ],
        cwd=root,
        check=True,
    )
    return root / "serving" / "oip"


def test_the_committed_stubs_are_what_the_vendored_proto_generates(regenerated):
    name = "grpc_predict_v2_pb2"
    assert serialized_descriptor(OIP / f"{name}.py") == serialized_descriptor(regenerated / f"{name}.py")
    assert methods(OIP / f"{name}_grpc.py") == methods(regenerated / f"{name}_grpc.py")
    classes = [re.findall(r"^class (\w+)", (d / f"{name}.pyi").read_text(), re.M) for d in (OIP, regenerated)]
    assert classes[0] == classes[1] and "ModelInferRequest" in classes[0]


def floor(package: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(rf'"{re.escape(package)}>=([\d.]+)"', text)[1]


def test_the_stubs_need_nothing_newer_than_the_serving_floors():
    """The gencode checks its protobuf runtime, the gRPC stubs their grpcio, at import."""
    pb2 = (OIP / "grpc_predict_v2_pb2.py").read_text()
    gencode = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert ".".join(gencode.groups()) == floor("protobuf")
    grpc_generated = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'", (OIP / "grpc_predict_v2_pb2_grpc.py").read_text()
    )
    assert grpc_generated[1] == floor("grpcio")


def fields(message: descriptor_pb2.DescriptorProto, prefix: str) -> dict[str, tuple]:
    """Every field of a message and its nested messages: full name -> (number, type, label, type name)."""
    out = {f"{prefix}.{f.name}": (f.number, f.type, f.label, f.type_name) for f in message.field}
    for nested in message.nested_type:
        out.update(fields(nested, f"{prefix}.{nested.name}"))
    return out


def test_tritons_client_protocol_agrees_with_ours_field_for_field():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours = serialized_descriptor(OIP / "grpc_predict_v2_pb2.py")
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    # The repository extension (RepositoryModelLoad/Unload) differs between KServe and Triton;
    # this service does not implement it (UNIMPLEMENTED). Everything else must agree.
    served = [m for m in ours.message_type if not m.name.startswith("Repository")]
    mine = {k: v for m in served for k, v in fields(m, m.name).items()}
    triton = {k: v for m in theirs.message_type for k, v in fields(m, m.name).items()}
    missing = {k: v for k, v in mine.items() if triton.get(k) != v}
    assert not missing, missing  # Triton's is a superset: every field of ours, same number and type
    (our_service,) = ours.service
    (their_service,) = [s for s in theirs.service if s.name == "GRPCInferenceService"]
    rpc = {m.name: (m.input_type, m.output_type) for m in their_service.method}
    for method in our_service.method:
        if method.name.startswith("Repository"):
            continue
        assert rpc[method.name] == (method.input_type, method.output_type), method.name

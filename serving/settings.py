"""Every setting, default and limit of the prediction service, in one place (pydantic-settings).

Each field comes from, in order: a `python -m serving` flag, an environment variable
ALEXNET_<FIELD> (ALEXNET_PORT, ALEXNET_MAX_IN_FLIGHT, ...), a `.env` file in the working
directory, else the default here. Values are typed and validated at start-up: a bad one
stops the server with a message, never a server that misbehaves later.

What it serves: `checkpoint`, a checkpoint folder, a run folder (its newest checkpoint) or a
folder of run folders (the newest checkpoint of the run that wrote one last); by default the
runs folder of the project's home, `home`/runs (ALEXNET_HOME, default ~/alexnet: pipeline.home),
where `python -m trainer.run` writes by default. So `python -m serving` alone serves the newest
checkpoint trained there.

The token: ALEXNET_TOKEN, or ALEXNET_TOKEN_FILE naming a file that holds it (a Docker or
Kubernetes secret). Unset = no auth (only sensible on loopback). Set but empty, an empty
file, or both at once: refused at start-up, so a typo can never mean "open".

The defaults are sized for the 2-core CPU reference machine (the model's forward pass does
50-70 images/s there at batch 32, benchmarks/serve.py): 128 images on their way are ~2 s of
work; raise max_queue_images and max_decodes with the cores or a GPU.

The edge (serving.edge, serving.upload): a request's headers must arrive within
header_timeout_s and its body within body_timeout_s (408 and closed); one client address
holds at most max_connections_per_client connections and all clients max_connections (503
and closed at once beyond); an image request is admitted (max_in_flight, the batcher's room)
only once its body is in, so a slow upload holds no model capacity. 10 s for headers is ample
on any link (they are a few hundred bytes); 30 s for the body passes a full 10 MiB upload at
2.8 Mbit/s and a typical 3 MB photograph at 0.8 Mbit/s. 32 connections per address are six
browsers' worth, or a batch client's pool; 32 x max_upload_bytes (320 MiB) stays under
max_body_memory_bytes, so one address cannot take the whole body budget.

Worst-case memory of the request path: max_body_memory_bytes of bodies (384 MiB; beyond it a
request gets 503 at once) + max_decodes x max_decode_bytes of decoding (512 MiB) + the queue
(128 x ~0.6 MB of crops) + per connection at most max_header_bytes of headers or uvicorn's
64 KiB body buffer, plus one read (256 KiB): 512 x ~0.3 MB; ~1.1 GiB with the defaults, on top of the process with the model
loaded (~0.5 GiB): compose's API_MEMORY (2 GiB) and the Kubernetes API's 4 GiB hold it;
deploy/README.md has the threat model and the operator's knobs.

The Open Inference Protocol (serving.oip): over HTTP on the same port and app (every limit
above applies), and over gRPC on `grpc_port` (`grpc=False` turns it off). gRPC has no
per-address bound and reads a whole message before the app sees it, so its own limits hold
it: a message is at most max_upload_bytes (grpc.max_receive_message_length), at most
grpc_max_concurrent_rpcs calls run at once (beyond: RESOURCE_EXHAUSTED at once, the message
unread), grpc_max_streams_per_connection per connection, grpc_max_connections connections,
metadata within max_header_bytes; a connection idle for grpc_idle_timeout_s is closed, and
every connection after grpc_max_connection_age_s (its calls then have body_timeout_s to
finish: so a message sent slowly holds a call at most that long), a client that pings more
often than every grpc_min_ping_interval_s is sent GOAWAY, and the server pings every
grpc_keepalive_s to find dead peers. Admitted calls then take the same
body memory, in-flight places, batcher room and deadline as HTTP requests. Its worst case
(grpc_max_concurrent_rpcs whole messages and each connection's buffers) is part of
worst_case_request_bytes: 16 x 10 MiB + 64 x ~0.3 MB with the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.home import DEFAULT_HOME, RUNS

ENV_PREFIX = "ALEXNET_"
MiB = 1024 * 1024
# A multipart body may exceed its file part by this much (boundaries, part headers, small
# fields); anything larger is refused while it streams.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FORM_PARTS = 8  # parts in a multipart upload (the file and a few fields)
MAX_FORM_FIELD_BYTES = 1024  # size of a non-file form field
# For the worst case of the request path (Settings.worst_case_request_bytes): one queued crop
# (3 x 227 x 227 float32, the paper's input), and what uvicorn may buffer for a connection
# beyond its headers (its body high-water mark, 64 KiB, plus one read of up to 256 KiB).
CROP_BYTES = 3 * 227 * 227 * 4
CONNECTION_BUFFER_BYTES = (64 + 256) * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True, protected_namespaces=()
    )

    home: Path = Field(default_factory=lambda: Path(DEFAULT_HOME).expanduser())  # ALEXNET_HOME (pipeline.home)
    # A checkpoint folder, a run folder (its newest checkpoint) or a folder of run folders; not
    # given: home/runs, trainer.run's default storage path.
    checkpoint: Path = Path()
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # How the network runs (serving.inference): "eager" is the network as trained (eager
    # float32 PyTorch), "optimized" the same answers faster on a CPU, "auto" the fastest
    # measured for the device (optimized on a CPU, eager on a GPU).
    inference: Literal["auto", "eager", "optimized"] = "auto"

    # Bounded work (admission control, once a request's body is in). Over a bound: 503 + Retry-After at once.
    max_in_flight: int = Field(64, ge=1)  # image requests (predict/embed/similar) being served at once
    max_queue_images: int = Field(128, ge=1)  # images of admitted requests being decoded, queued or run
    request_timeout_s: float = Field(10.0, gt=0)  # from admission to the answer: then 503, work dropped
    retry_after_s: int = Field(1, ge=0)  # the Retry-After a 503 carries

    # The edge: slow, idle and greedy clients (serving.edge, serving.upload).
    header_timeout_s: float = Field(10.0, gt=0)  # request line + headers within this: else 408, closed
    body_timeout_s: float = Field(30.0, gt=0)  # the whole body within this after its headers: else 408, closed
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers: 431 beyond, closed
    max_connections: int = Field(512, ge=1)  # open connections in all: one more gets 503, closed at once
    max_connections_per_client: int = Field(32, ge=1)  # open connections from one client address: likewise
    max_body_memory_bytes: int = Field(384 * MiB, ge=1)  # bodies held at once, all requests: 503 beyond

    # Bounded input.
    max_upload_bytes: int = Field(10 * MiB, ge=1)  # a body larger than this gets 413 while it streams
    max_pixels: int = Field(40_000_000, ge=1)  # decoded-size guard (decompression bombs)
    max_side: int = Field(20_000, ge=1)  # either side longer than this: 413 (absurd dimensions)
    max_decode_bytes: int = Field(256 * MiB, ge=1)  # memory one decode may need, estimated from the header
    max_decodes: int = Field(2, ge=1)  # images decoded at once (threads); the rest wait their turn

    # Micro-batching.
    max_batch: int = Field(32, ge=1)  # at most this many images per forward pass
    max_wait_ms: float = Field(5.0, ge=0)  # ... collected for at most this long after the first arrives
    # Decoding and the forward pass take turns on the cores (serving.turns): "auto" where the
    # model runs on the CPU (at once, they slow each other down 4x on 2 cores), never on a GPU.
    take_turns: Literal["auto", "on", "off"] = "auto"
    # Taking turns, a batch also waits for requests still decoding, up to this long after its
    # first image (a batch sent without them would hold their decodes up for a forward pass).
    max_gather_ms: float = Field(50.0, ge=0)
    batching: bool = True
    max_k: int = Field(100, ge=1)

    # Auth.
    token: SecretStr | None = None
    token_file: Path | None = None

    # Retrieval (/similar).
    index: Path | None = None  # a folder of images or a shard set, indexed at start-up
    index_split: str = "val"  # which split of a shard set
    # Roots under which POST /index may index on request (os.pathsep-separated); empty = off,
    # since it makes the server read files from its own disk.
    index_roots: str = ""
    # At most this many images in an index (16 KiB of fc7 vector each: 100,000 is ~1.6 GB);
    # a larger folder or split is indexed up to it and reported as truncated.
    max_index_images: int = Field(100_000, ge=1)

    # How the model runs: torch (the checkpoint's own network), or onnxruntime (the same
    # network exported to ONNX at load, trainer.export, run by ONNX Runtime on the CPU; needs
    # the `onnx` extra). Both give the same answers (the export's parity check).
    backend: Literal["torch", "onnxruntime"] = "torch"

    # The Open Inference Protocol (KServe v2; serving.oip): HTTP under /v2 on `port`, gRPC here.
    model_name: str = Field("alexnet", pattern=r"^[A-Za-z0-9_.-]+$")  # its version: the checkpoint's epoch
    max_request_images: int = Field(32, ge=1)  # images in one v2 inference request: 400 beyond
    grpc: bool = True  # serve inference.GRPCInferenceService and grpc.health.v1 on grpc_port
    grpc_port: int = Field(8001, ge=0, le=65535)  # Triton's: HTTP 8000, gRPC 8001
    grpc_max_concurrent_rpcs: int = Field(16, ge=1)  # calls at once, all connections: RESOURCE_EXHAUSTED beyond
    grpc_max_streams_per_connection: int = Field(8, ge=1)  # HTTP/2 streams one connection may open at once
    grpc_max_connections: int = Field(64, ge=1)  # open gRPC connections: more are refused
    grpc_idle_timeout_s: float = Field(300.0, gt=0)  # a connection with no call for this long is closed
    # Every connection is closed after this long (GOAWAY; its calls get body_timeout_s to finish):
    # gRPC reads a message without a deadline of its own, so this bounds how long a client
    # that sends one slowly holds a call. Clients reconnect by themselves.
    grpc_max_connection_age_s: float = Field(60.0, gt=0)
    grpc_keepalive_s: float = Field(60.0, gt=0)  # the server pings each connection this often (dead peers)
    grpc_min_ping_interval_s: float = Field(30.0, gt=0)  # a client pinging more often than this gets GOAWAY

    # Given a run folder: look for a newer checkpoint every watch_s seconds (0 = never) and
    # switch to it without a restart (training and serving side by side).
    watch_s: float = Field(0.0, ge=0)
    run_dir: Path | None = None  # set by `python -m serving` when --checkpoint is a run folder

    @field_validator("home")
    @classmethod
    def _home_expanded(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _checkpoint_from_home(self) -> Settings:
        if "checkpoint" not in self.model_fields_set:
            object.__setattr__(self, "checkpoint", self.home / RUNS)  # frozen model: set once, here
        return self

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(f"{ENV_PREFIX}TOKEN is set but empty: set a real token, or unset it to run without auth")
        return value

    @model_validator(mode="after")
    def _token_from_file(self) -> Settings:
        if self.token_file is None:
            return self
        if self.token is not None:
            raise ValueError(f"both {ENV_PREFIX}TOKEN and {ENV_PREFIX}TOKEN_FILE are set: choose one")
        try:
            secret = self.token_file.read_text("utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read {ENV_PREFIX}TOKEN_FILE {self.token_file}: {exc.strerror}") from None
        if not secret:
            raise ValueError(f"{ENV_PREFIX}TOKEN_FILE {self.token_file} is empty")
        object.__setattr__(self, "token", SecretStr(secret))  # frozen model: set once, here
        return self

    @model_validator(mode="after")
    def _a_whole_upload_fits(self) -> Settings:
        if self.max_body_memory_bytes < self.max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
            raise ValueError(
                f"max_body_memory_bytes ({self.max_body_memory_bytes:,}) must hold at least one whole "
                f"upload: max_upload_bytes + {MULTIPART_OVERHEAD_BYTES:,} of multipart framing"
            )
        return self

    @property
    def worst_case_request_bytes(self) -> int:
        """The most the request path can hold at once with these settings: bodies, decodes,
        queued crops, and every open connection's headers or buffer (deploy/ sizes the
        API's memory limit by it; tests/deploy holds it there)."""
        return (
            self.max_body_memory_bytes
            + self.max_decodes * self.max_decode_bytes
            + self.max_queue_images * CROP_BYTES
            + self.max_connections * (self.max_header_bytes + CONNECTION_BUFFER_BYTES)
            + (self.grpc_worst_case_bytes if self.grpc else 0)
        )

    @property
    def grpc_worst_case_bytes(self) -> int:
        """gRPC reads a call's whole message before the app sees it: at most
        grpc_max_concurrent_rpcs messages of max_upload_bytes, plus each connection's
        metadata and buffers."""
        return self.grpc_max_concurrent_rpcs * self.max_upload_bytes + self.grpc_max_connections * (
            self.max_header_bytes + CONNECTION_BUFFER_BYTES
        )

    @property
    def auth(self) -> bool:
        return self.token is not None

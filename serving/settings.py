"""Every setting, default and limit of the prediction service, in one place (pydantic-settings).

Each field comes from, in order: a `python -m serving` flag, an environment variable
ALEXNET_<FIELD> (ALEXNET_PORT, ALEXNET_MAX_IN_FLIGHT, ...), a `.env` file in the working
directory, else the default here. Values are typed and validated at start-up: a bad one
stops the server with a message, never a server that misbehaves later.

The token: ALEXNET_TOKEN, or ALEXNET_TOKEN_FILE naming a file that holds it (a Docker or
Kubernetes secret). Unset = no auth (only sensible on loopback). Set but empty, an empty
file, or both at once: refused at start-up, so a typo can never mean "open".

The admission defaults are sized for the 2-core CPU reference machine (the model's forward
pass does 50-70 images/s there at batch 32, benchmarks/serve.py): 128 images on their way
are ~2 s of work; raise max_queue_images and max_decodes with the cores or a GPU. Worst-case memory
of the request path: max_in_flight x max_upload_bytes of bodies (640 MiB) + max_decodes x
max_decode_bytes of decoding (512 MiB) + the queue (128 x ~0.6 MB of crops), ~1.2 GB with
the defaults, on top of the process with the model loaded (~0.5 GiB): compose's API_MEMORY
(2 GiB) and the Kubernetes API's 4 GiB hold it; deploy/README.md has the threat model and
the operator's knobs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ALEXNET_"
MiB = 1024 * 1024
# A multipart body may exceed its file part by this much (boundaries, part headers, small
# fields); anything larger is refused while it streams.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_FORM_PARTS = 8  # parts in a multipart upload (the file and a few fields)
MAX_FORM_FIELD_BYTES = 1024  # size of a non-file form field


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True)

    checkpoint: Path = Path("checkpoint")  # a checkpoint folder, or a run folder (its newest checkpoint)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    # Bounded work (admission control). Over a bound: 503 + Retry-After at once.
    max_in_flight: int = Field(64, ge=1)  # image requests (predict/embed/similar) being served at once
    max_queue_images: int = Field(128, ge=1)  # images of admitted requests being decoded, queued or run
    request_timeout_s: float = Field(10.0, gt=0)  # deadline of an accepted request: then 503, work dropped
    retry_after_s: int = Field(1, ge=0)  # the Retry-After a 503 carries
    max_connections: int = Field(512, ge=1)  # uvicorn's limit_concurrency (connections + tasks): 503 beyond

    # Bounded input.
    max_upload_bytes: int = Field(10 * MiB, ge=1)  # a body larger than this gets 413 while it streams
    max_pixels: int = Field(40_000_000, ge=1)  # decoded-size guard (decompression bombs)
    max_side: int = Field(20_000, ge=1)  # either side longer than this: 413 (absurd dimensions)
    max_decode_bytes: int = Field(256 * MiB, ge=1)  # memory one decode may need, estimated from the header
    max_decodes: int = Field(2, ge=1)  # images decoded at once (threads); the rest wait their turn

    # Micro-batching.
    max_batch: int = Field(32, ge=1)  # at most this many images per forward pass
    max_wait_ms: float = Field(5.0, ge=0)  # ... collected for at most this long after the first arrives
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

    # Given a run folder: look for a newer checkpoint every watch_s seconds (0 = never) and
    # switch to it without a restart (training and serving side by side).
    watch_s: float = Field(0.0, ge=0)
    run_dir: Path | None = None  # set by `python -m serving` when --checkpoint is a run folder

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(f"{ENV_PREFIX}TOKEN is set but empty: set a real token, or unset it to run without auth")
        return value

    @model_validator(mode="after")
    def _token_from_file(self) -> "Settings":
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

    @property
    def auth(self) -> bool:
        return self.token is not None

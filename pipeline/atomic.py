"""Write, then rename: the project's one way to put a file in place, so that a reader never
sees half of one. Shards and their indexes, completion records, the manifest, checkpoints,
run-folder files, figures and the Ray token all go through `replacing` (or `write_atomic`,
built on it): a crash, a kill or a full disk leaves the old file or none, plus at most a
hidden `.<name>.<pid>.tmp` beside it, never a truncated file under the real name.

A write that runs out of room (ENOSPC, or EDQUOT: a quota) removes its temporary file and
raises `OutOfSpace`, one line naming the file and the space left on its filesystem; the
commands catch it and exit with `EXIT_OUT_OF_SPACE` and that line, never a traceback. What
was complete before stays complete, so the same command run again after freeing space
resumes (the sharder keeps finished shards; training resumes from its newest checkpoint).

It lives in the lowest layer that writes files (stage 1); trainer, serving and deploy
import it from here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"  # pipeline.outdir removes `.*.tmp` leftovers of a killed run
EXIT_OUT_OF_SPACE = 4  # every command's exit status when a write runs out of space
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem holding `path` (its nearest
    existing folder), or None where that cannot be asked."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def size_text(n: int | None) -> str:
    if n is None:
        return "unknown space"
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class OutOfSpace(OSError):
    """A write that found its filesystem full (or would: `needed`, when known beforehand):
    names the file and what is left free there."""

    def __init__(self, path: str | Path, free: int | None, needed: int | None = None):
        text = f"out of space writing {path or 'a file'}: {size_text(free)} free there"  # path "": not known
        if needed is not None:
            text += f", about {size_text(needed)} needed"
        super().__init__(errno.ENOSPC, text, str(path))
        self.path, self.free, self.needed = str(path), free, needed

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self):  # from worker processes and Ray tasks, as raised
        return (OutOfSpace, (self.path, self.free, self.needed))


def no_space(exc: BaseException) -> bool:
    """An ENOSPC/EDQUOT, as an OSError or as a library that writes through its own code says
    it (safetensors raises SafetensorError("... No space left on device (os error 28)"))."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE
    text = str(exc)
    return any(os.strerror(e) in text or f"os error {e})" in text for e in NO_SPACE)


def out_of_space(exc: BaseException) -> OutOfSpace | None:
    """The OutOfSpace in an exception or what caused it (a Ray or process-pool wrapper's cause,
    a bare ENOSPC from a library), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutOfSpace):
            return exc
        if no_space(exc):
            filename = getattr(exc, "filename", None)
            return OutOfSpace(filename or "", free_bytes(Path(filename)) if filename else None)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def temporary_path(path: Path, suffix: str = "") -> Path:
    """The hidden name `path` is written under before it is renamed into place (per process,
    so concurrent writers never share one). `suffix` keeps an extension a writer needs."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}{suffix}")


@contextmanager
def replacing(path: Path, *, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends, move what was written there
    onto `path` in one rename. A block that raises leaves `path` as it was and removes the
    temporary file; a block that removes it (nothing worth keeping) renames nothing."""
    path = Path(path)
    tmp = temporary_path(path, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            return
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if no_space(exc) and not isinstance(exc, OutOfSpace):
            raise OutOfSpace(path, free_bytes(path.parent)) from exc
        raise


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None, fsync: bool = True) -> Path:
    """`data` into `path`, write-then-rename; `mode` sets the permissions from the first byte
    (a secret is never readable by others, even half-written)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def exits_cleanly_when_full(
    log: logging.Logger, then: str = "Free some space and run the same command again"
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """For a command's main(): an OutOfSpace (or a bare ENOSPC) from anywhere inside becomes
    one error line, the path and the room left and what to do `then`, and EXIT_OUT_OF_SPACE."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except Exception as exc:
                full = out_of_space(exc)
                if full is None:
                    raise
                log.error("%s. %s", full, then)
                return EXIT_OUT_OF_SPACE

        return guarded

    return wrap

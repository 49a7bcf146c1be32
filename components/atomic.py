"""Writes that are all-or-nothing: a failed step leaves no half-written output behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """This machine's content cache ($FINETUNE_CACHE, default ~/.cache/finetune-pipeline): files
    under sha256/<digest of their bytes>, shared by the weights and the images of S3 datasets."""
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-pipeline")


def sweep(out: Path) -> None:
    """Remove the temporaries beside `out` of writers that were killed (the writer's process id is
    in the name, and no such process runs here any more), so a kill leaves no lasting debris."""
    for old in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = old.name.removeprefix(f".{out.name}.tmp-").split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield an empty temporary folder beside `out`; on success it replaces `out`, on error it goes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as err:  # a read-only or full disk: name the output, not the temporary
        raise OSError(err.errno, err.strerror, str(out)) from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.filename and str(err.filename).startswith(f"{tmp}{os.sep}"):  # name the file as it would be
            raise OSError(err.errno, err.strerror, str(out / Path(err.filename).relative_to(tmp))) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike):
    """Yield a temporary path beside `out`; on success it is renamed to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(out)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj, out: str | os.PathLike) -> None:
    """torch.save to `out`, all or nothing; a full disk is an OSError naming `out` (torch alone
    says "[enforce fail at inline_container.cc] unexpected pos" and names nothing)."""
    import torch

    with atomic_file(out) as tmp, open(tmp, "wb", buffering=0) as raw:
        writer = _Writer(raw)
        try:
            torch.save(obj, writer)
        except (OSError, RuntimeError) as err:
            cause = writer.error or err
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, cause.strerror, str(out)) from None


class _Writer:
    """What torch.save writes through: each write whole or an error, and the error kept, since
    torch swallows a failed write and stops later at a position check that names no cause."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.raw.write(view):]
        except OSError as err:
            self.error = err
            raise
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        # allow_nan=False: NaN and Infinity are not JSON, and a reader would choke on them later
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

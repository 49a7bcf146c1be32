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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield an empty temporary folder beside `out`; on success it replaces `out`, on error it goes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
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
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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

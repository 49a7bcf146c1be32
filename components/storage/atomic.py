"""Writes that are all-or-nothing: a failed step leaves no half-written output behind, and a crash
leaves either the old output or the new one on the disk."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path


def _writer_identity() -> str:
    """This machine and PID namespace, in a temporary's name: a process id means something only there. On a
    folder shared between nodes or containers (a ReadWriteMany claim), another node's writer cannot be seen,
    so its temporaries are never taken for a dead writer's."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:10]


def temporary_prefix(out: Path) -> str:
    """How a writer of `out` names its temporaries: `.<name>.tmp-<pid>.<machine>-`, so `sweep` can tell
    whose they are."""
    return f".{out.name}.tmp-{os.getpid()}.{_writer_identity()}-"


def sweep(out: Path) -> None:
    """Remove the temporaries beside `out` of writers that were killed (the writer's process id is in the
    name, with the machine it ran on, and no such process runs here any more), so a kill leaves no lasting
    debris. Temporaries of writers on other machines or in other PID namespaces are left alone."""
    here = _writer_identity()
    for old in out.parent.glob(f".{out.name}.tmp-*-*"):
        owner = old.name.removeprefix(f".{out.name}.tmp-").split("-")[0]
        pid, _, machine = owner.partition(".")
        if not pid.isdigit() or int(pid) == os.getpid() or (machine and machine != here):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _sync_tree(folder: Path) -> None:
    """Everything written under `folder` on the disk before it is renamed into place: one syncfs(2) for
    the file system (cheap for many files), each file's fsync where that call does not exist."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _LIBC is not None and _LIBC.syncfs(fd) == 0:
            return
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): at no moment is either missing.
    False where the file system or the C library cannot."""
    if _LIBC is None or not hasattr(_LIBC, "renameat2"):
        return False
    at_cwd, rename_exchange = -100, 2
    return _LIBC.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield an empty temporary folder beside `out`; on success it replaces `out`, on error it goes.

    The new folder is on the disk before it takes `out`'s place, and it takes it in one step: a reader
    finds the old output or the new one, never none."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), dir=out.parent))
    except OSError as err:  # a read-only or full disk: name the output, not the temporary
        raise OSError(err.errno, err.strerror, str(out)) from None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        _sync_tree(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.filename and str(err.filename).startswith(f"{tmp}{os.sep}"):  # name the file as it would be
            raise OSError(err.errno, err.strerror, str(out / Path(err.filename).relative_to(tmp))) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() and _exchange(tmp, out):
        pass  # tmp now holds the old output, under a name sweep knows
    elif out.exists():  # no exchange here: the old output steps aside first, named as a temporary too
        old = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), dir=out.parent))
        os.replace(out, old / "old")
        os.replace(tmp, out)
        tmp = old
    else:
        os.replace(tmp, out)
        tmp = None
    _fsync(out.parent)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def drafted(out: str | os.PathLike, draft):
    """`draft(folder)` over a temporary folder that becomes `out` whole when the block ends (atomic_dir):
    how an artifact with several files is written."""
    with atomic_dir(out) as tmp:
        yield draft(tmp)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike):
    """Yield a temporary path beside `out`; on success it is renamed to `out`, its bytes on the disk first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out)
    try:
        fd, name = tempfile.mkstemp(prefix=temporary_prefix(out), dir=out.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(out)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private
        _fsync(tmp)
        os.replace(tmp, out)
        _fsync(out.parent)
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


def write_csv(path: str | os.PathLike, header: list, rows) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

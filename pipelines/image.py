"""The component image's reference: params.yaml's `pipeline.image` repository, tagged with a hash
of what infra/Dockerfile copies into it (the runtime lock and the Python code, as .dockerignore
selects). The compiled pipeline names that tag and `make image` builds it, so a task's Kubeflow
cache key changes whenever its code or dependencies do, and the tag says which code ran.

A reference that already has a tag or a digest (`...:1.2`, `...@sha256:...`) is used as written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_FILES = ("requirements.lock", "components/**/*.py", "pipelines/**/*.py")


def code_hash(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    files = sorted({p for pattern in IMAGE_FILES for p in root.glob(pattern)
                    if p.is_file() and "__pycache__" not in p.parts})
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()


def reference(repository: str, root: Path = ROOT) -> str:
    """`repository:code-<12 hex>`, or `repository` when it already names a tag or digest."""
    last = repository.rsplit("/", 1)[-1]
    if "@" in repository or ":" in last:
        return repository
    return f"{repository}:code-{code_hash(root)[:12]}"


if __name__ == "__main__":  # `make image` asks for the reference to build
    import sys

    from components.config import load_params

    print(reference(load_params(ROOT / "params.yaml").pipeline.image))
    sys.exit(0)

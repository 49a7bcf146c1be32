"""This machine's content cache: $FINETUNE_CACHE, default ~/.cache/finetune-pipeline.

    sha256/<digest>   files by the SHA-256 of their bytes: pretrained weights, the images of S3 datasets
    index.json        immutable sources (an https URL with its pin, an S3 object at its ETag, a registry
                      version) mapped to digests, so a repeated run fetches nothing
Files enter it only whole and checked (renamed into place), so whatever it holds is what its name says.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from components.storage.atomic import write_json


def root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-pipeline")


def blobs() -> Path:
    """The folder of files by digest, created when missing."""
    folder = root() / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached(sha256: str) -> Path | None:
    """The cached file with this digest, or None."""
    path = root() / "sha256" / sha256
    return path if sha256 and path.is_file() else None


def _index() -> dict:
    try:
        return json.loads((root() / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def lookup(key: str) -> Path | None:
    """The cached file an immutable source was stored as, or None."""
    return cached(_index().get(key, ""))


def remember(key: str, sha256: str) -> None:
    write_json(root() / "index.json", {**_index(), key: sha256})


def keep(path: Path, sha256: str) -> Path:
    """Move a checked file into the cache under its digest (a copy already there wins)."""
    final = blobs() / sha256
    if not final.exists():
        shutil.move(path, final)
    return final

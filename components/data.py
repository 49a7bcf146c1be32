"""data: validate an ImageFolder dataset, split it by content hash, write the dataset artifact.

    python -m components.data --params params.yaml --out data/prepared

The artifact is self-contained (a Kubeflow Dataset can be moved as one folder):
    images/<class>/<file>   byte-for-byte copies of the source files
    manifest.csv            path, label, split, sha256, width, height per image
    report.json             counts per class and split, the data fingerprint, the config used
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from components.atomic import atomic_dir, write_json
from components.config import DataConfig, load_params
from components.images import decode

SPLITS = ("train", "val", "test")
PARALLEL_FROM = 256  # files; below this a process pool costs more than it saves


class DataError(ValueError):
    """The dataset cannot be used; the message names the files or classes and why."""


@dataclass(frozen=True)
class ImageRecord:
    relpath: str  # "<class>/<path inside the class folder>", POSIX separators
    label: str
    sha256: str
    width: int
    height: int


def inspect_file(path: str) -> tuple[str, int, int] | str:
    """(sha256, width, height) for a decodable image, else the reason it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = decode(data)
    except (ValueError, OSError) as err:
        return str(err)
    return hashlib.sha256(data).hexdigest(), img.width, img.height


def list_images(source: Path, cfg: DataConfig) -> tuple[dict[str, list[Path]], list[str]]:
    """Class folders and their image files; also the names of files ignored as non-images."""
    if not source.is_dir():
        raise DataError(f"data.source: {source} is not a directory")
    present = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cfg.classes:
        missing = [c for c in cfg.classes if c not in present]
        if missing:
            raise DataError(f"data.classes: class folder(s) missing in {source}: {', '.join(missing)}")
        present = list(cfg.classes)
    if len(present) < 2:
        raise DataError(f"{source}: found {len(present)} class folder(s) {present}; classification needs at least 2")
    extensions = {e.lower() for e in cfg.extensions}
    files, ignored = {}, []
    for label in present:
        found = []
        for path in sorted((source / label).rglob("*")):
            if path.is_dir():
                continue
            if path.suffix.lower() in extensions:
                found.append(path)
            else:
                ignored.append(path.relative_to(source).as_posix())
        if not found:
            raise DataError(f"{source / label}: class folder has no image files")
        files[label] = found
    return files, ignored


def assign_split(sha256: str, cfg: DataConfig) -> str:
    """Split from the content hash alone: adding images never moves an existing one, and
    identical images always land together (no train/test leakage through duplicates)."""
    digest = hashlib.sha256(f"{cfg.seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def fingerprint(records: list[ImageRecord]) -> str:
    """Content hash of the dataset: every file's path, class and bytes."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.relpath):
        h.update(f"{r.relpath}\t{r.sha256}\n".encode())
    return h.hexdigest()


def prepare(source: str | Path, out: str | Path, cfg: DataConfig) -> dict:
    """Validate every image under `source`, split, and write the dataset artifact to `out`.

    Returns the data report. Raises DataError listing every unreadable file with its reason;
    nothing is written then.
    """
    source = Path(source)
    files, ignored = list_images(source, cfg)
    paths = [p for label in files for p in files[label]]
    workers = cfg.workers or os.cpu_count() or 1
    progress = dict(total=len(paths), desc="data: decoding", unit="img", file=sys.stderr)
    if workers > 1 and len(paths) >= PARALLEL_FROM:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(inspect_file, map(str, paths), chunksize=32), **progress))
    else:
        results = [inspect_file(str(p)) for p in tqdm(paths, **progress)]

    invalid = [f"{p}: {r}" for p, r in zip(paths, results) if isinstance(r, str)]
    if invalid:
        raise DataError(f"{len(invalid)} unreadable image file(s) in {source}:\n  " + "\n  ".join(invalid))

    records = []
    for path, (sha, width, height) in zip(paths, results):
        rel = path.relative_to(source)
        records.append(ImageRecord(rel.as_posix(), rel.parts[0], sha, width, height))

    labels = list(files)
    splits = {r.relpath: assign_split(r.sha256, cfg) for r in records}
    counts = {s: {label: 0 for label in labels} for s in SPLITS}
    for r in records:
        counts[splits[r.relpath]][r.label] += 1
    short = [f"{label} (train {counts['train'][label]}, val {counts['val'][label]}, test {counts['test'][label]})"
             for label in labels if min(counts[s][label] for s in SPLITS) == 0]
    if short:
        raise DataError(
            "class(es) too small for data.val_fraction/data.test_fraction: every split needs at least "
            "one image of every class: " + "; ".join(short))

    by_hash: dict[str, list[str]] = {}
    for r in records:
        by_hash.setdefault(r.sha256, []).append(r.relpath)
    report = {
        "fingerprint": fingerprint(records),
        "source": str(source),
        "classes": labels,
        "num_images": len(records),
        "counts": counts,
        "duplicates": [group for group in by_hash.values() if len(group) > 1],
        "ignored_files": ignored,
        "config": cfg.model_dump(mode="json"),
    }

    with atomic_dir(out) as tmp:
        for r in tqdm(records, desc="data: copying", unit="img", file=sys.stderr):
            dest = tmp / "images" / r.relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / r.relpath, dest)
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split", "sha256", "width", "height"])
            for r in records:
                writer.writerow([f"images/{r.relpath}", r.label, splits[r.relpath], r.sha256, r.width, r.height])
        write_json(tmp / "report.json", report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: data)")
    parser.add_argument("--source", help="ImageFolder dataset; overrides data.source")
    parser.add_argument("--out", required=True, help="folder for the dataset artifact")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).data
    report = prepare(args.source or cfg.source, args.out, cfg)
    print(f"data: {report['num_images']} images, {len(report['classes'])} classes, "
          f"fingerprint {report['fingerprint'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

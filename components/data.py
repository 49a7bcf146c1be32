"""data: validate an ImageFolder dataset, split it by content hash, write the dataset artifact.

    python -m components.data --params params.yaml --out data/prepared

The artifact (components/artifacts/dataset.py) is a manifest of immutable references, not a copy of
every image: path inside the source, label, split and sha256 of each image, where the images are, and a
report (counts per class and split, the data fingerprint, the config used). Only a DVC-tracked source is
copied into it. Later steps read the images they use from the source and refuse any whose bytes no
longer match the manifest's sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import joblib
from tqdm import tqdm

from components.artifacts import dataset
from components.config import DataConfig, load_params
from components.redaction import redact
from components.storage import cache
from components.storage.images import check
from components.storage.sources import describe, materialize

SPLITS = ("train", "val", "test")
PARALLEL_FROM = 256  # files; below this a process pool costs more than it saves
MIN_TEST_PER_CLASS, MIN_VAL_PER_CLASS, MIN_TEST_IMAGES = 10, 5, 50  # below these the report warns


class DataError(ValueError):
    """The dataset cannot be used; the message names the files or classes and why."""


def inspect_file(path: str, root: str = "", copy_to: str = "") -> tuple[str, int, int] | str:
    """(sha256, width, height) for a decodable image, else the reason it is not one.

    With `copy_to`, a valid file's bytes are also written to `copy_to`/<path relative to root>:
    each file is read once, and the copying runs in the same worker processes as the decoding.
    """
    # the file or a folder on its way there (a class folder) may be a symlink: where it resolves is what counts
    if root and not Path(path).resolve().is_relative_to(root):
        link = "symlink" if os.path.islink(path) else "in a symlinked folder,"
        return f"{link} pointing outside the dataset folder (to {Path(path).resolve()})"
    try:
        with open(path, "rb") as f:
            data = f.read()
        width, height = check(data)
    except (ValueError, OSError) as err:
        return str(err)
    if copy_to:
        dest = Path(copy_to, os.path.relpath(path, root))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), width, height


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
            if path.is_dir() and not path.is_symlink():
                continue
            if path.suffix.lower() in extensions:
                found.append(path)
            else:
                ignored.append(path.relative_to(source).as_posix())
        files[label] = found  # an empty class is reported with every other problem (_validate_and_write)
    return files, ignored


def _rank(sha256: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).digest()


def split_sizes(n: int, cfg: DataConfig) -> tuple[int, int]:
    """(test, val) counts for a class of `n` distinct images: the configured shares, rounded half
    up, at least one each where the class has three or more, and at least one left to train on."""
    n_test, n_val = int(n * cfg.test_fraction + 0.5), int(n * cfg.val_fraction + 0.5)
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    while n_test + n_val >= n and n_test + n_val > 0:  # tiny classes: give training the last one
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def assign_splits(records: list[dataset.Row], cfg: DataConfig) -> dict[str, str]:
    """Split of every image, stratified by class and decided by content alone.

    Within a class, distinct contents are ordered by a hash of (data.seed, sha256); the first
    `split_sizes` of them go to test, the next to val, the rest to train. Identical files are one
    entry, so duplicates always share a split (no leakage through copies). Exact proportions cost
    a little stability: each image added to a class can push at most one existing image across each
    of its two boundaries; other classes do not move.
    """
    label_of: dict[str, str] = {}
    for r in records:  # (one image in two classes is refused before: _validate_and_write)
        label_of.setdefault(r.sha256, r.label)
    by_class: dict[str, list[str]] = {}
    for sha, label in label_of.items():
        by_class.setdefault(label, []).append(sha)
    split_of = {}
    for shas in by_class.values():
        shas.sort(key=lambda h: _rank(h, cfg.seed))
        n_test, n_val = split_sizes(len(shas), cfg)
        for i, sha in enumerate(shas):
            split_of[sha] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return {r.path: split_of[r.sha256] for r in records}


def small_split_warnings(counts: dict[str, dict[str, int]]) -> list[str]:
    """Where the validation or test split is too small for the gate's numbers to mean much."""
    warnings = []
    for split, least in (("test", MIN_TEST_PER_CLASS), ("val", MIN_VAL_PER_CLASS)):
        small = {label: n for label, n in counts[split].items() if n < least}
        if small:
            listed = ", ".join(f"{label} {n}" for label, n in small.items())
            warnings.append(f"{split} split: fewer than {least} images for class(es) {listed}: "
                            + ("per-class recall moves in steps of 1/n and the gate's checks are coarse"
                               if split == "test" else "early stopping follows a noisy validation loss"))
    total = sum(counts["test"].values())
    if total < MIN_TEST_IMAGES:
        warnings.append(f"test split: {total} images: one image is {1 / max(total, 1):.1%} of accuracy, "
                        f"too coarse to compare with a champion (at least {MIN_TEST_IMAGES} advised)")
    return warnings


def fingerprint(records: list[dataset.Row]) -> str:
    """Content hash of the dataset: every file's path, class and bytes."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        h.update(f"{r.path}\t{r.sha256}\n".encode())
    return h.hexdigest()


def prepare(source: str | Path, out: str | Path, cfg: DataConfig, version: str = "") -> dict:
    """Fetch (data_sources), validate every image under `source`, split, write the dataset artifact to `out`.

    `version`: the source's version as resolved at the start of the run (storage.sources.pin);
    the data read is that version, or the step fails. Returns the data report. Raises DataError
    listing every unreadable file with its reason (with data.on_invalid: skip, only when more than
    data.max_invalid_fraction are); nothing is written then.
    """
    cfg = cfg.model_copy(update={"source": str(source)})
    with tempfile.TemporaryDirectory(prefix="dataset-") as staging:
        local, dvc_hash = materialize(cfg, Path(staging), version)
        files, ignored = list_images(local, cfg)
        paths = [p for label in files for p in files[label]]
        with dataset.publish(out) as draft:  # any error below leaves nothing: no half-written artifact
            return _validate_and_write(local, paths, files, ignored, draft, cfg, dvc_hash, _where(cfg), version)


def _check(paths: list[Path], root: Path, workers: int, copy_to: Path) -> list:
    progress = dict(total=len(paths), desc="data: validating", unit="img", file=sys.stderr)
    # paths are handed over resolved, so relpath against the resolved root names the class folder
    check = partial(inspect_file, root=str(root.resolve()), copy_to=str(copy_to))
    paths = [root.resolve() / p.relative_to(root) for p in paths]
    if workers > 1 and len(paths) >= PARALLEL_FROM:
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(check, map(str, paths), chunksize=64), **progress))
    return [check(str(p)) for p in tqdm(paths, **progress)]


def _where(cfg: DataConfig) -> dict:
    """Where later steps find the images (components/artifacts/dataset.py)."""
    if cfg.repo:  # its remote may need the repository's credentials, which later steps do not get
        return {"kind": "artifact", "location": "images"}
    if cfg.source.startswith("s3://"):
        return {"kind": "s3", "location": cfg.source.rstrip("/") + "/"}
    return {"kind": "folder", "location": cfg.source}


def _validate_and_write(source, paths, files, ignored, draft: dataset.Draft, cfg: DataConfig, dvc_hash, where,
                        version: str) -> dict:
    copy_to = draft.images if where["kind"] == "artifact" else ""
    # joblib.cpu_count: the CPUs this process may use, a container's CPU quota (cgroup v1 or v2) included
    results = _check(paths, source, cfg.workers or joblib.cpu_count(), copy_to)

    # The same bytes in two class folders: which label is right cannot be known, so neither is kept.
    labels_of: dict[str, set[str]] = {}
    for path, result in zip(paths, results):
        if not isinstance(result, str):
            labels_of.setdefault(result[0], set()).add(path.relative_to(source).parts[0])
    for i, (path, result) in enumerate(zip(paths, results)):
        if not isinstance(result, str) and len(labels_of[result[0]]) > 1:
            others = ", ".join(sorted(labels_of[result[0]] - {path.relative_to(source).parts[0]}))
            results[i] = f"the same bytes are also in class folder(s) {others}: one image, two labels"
    invalid = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
    listing = "\n  ".join(f"{p}: {r}" for p, r in invalid)
    problems = [f"{source / label}: class folder has no image files" for label, found in files.items() if not found]
    if invalid and cfg.on_invalid == "error":
        problems.append(f"{len(invalid)} unusable image file(s) in {cfg.source}:\n  {listing}")
    elif paths and len(invalid) > cfg.max_invalid_fraction * len(paths):
        problems.append(f"{len(invalid)} of {len(paths)} files are unreadable ({len(invalid) / len(paths):.1%}), "
                        f"more than data.max_invalid_fraction ({cfg.max_invalid_fraction:.1%}):\n  {listing}")
    if problems:  # every problem in one message: one fix-and-rerun, not one per problem
        raise DataError("\n".join(problems))

    records = []
    for path, result in zip(paths, results):
        if not isinstance(result, str):
            rel = path.relative_to(source)
            sha256, width, height = result
            records.append(dataset.Row(rel.as_posix(), rel.parts[0], "", sha256, width, height))  # split: below
    emptied = [label for label in files if not any(r.label == label for r in records)]
    if emptied:
        raise DataError(f"class folder(s) with no readable image left: {', '.join(emptied)}")

    labels = list(files)
    splits = assign_splits(records, cfg)
    counts = {s: {label: 0 for label in labels} for s in SPLITS}
    for r in records:
        counts[splits[r.path]][r.label] += 1
    short = [f"{label} (train {counts['train'][label]}, val {counts['val'][label]}, test {counts['test'][label]})"
             for label in labels if min(counts[s][label] for s in SPLITS) == 0]
    if short:
        raise DataError(
            "class(es) too small for data.val_fraction/data.test_fraction: every split needs at least "
            "one image of every class: " + "; ".join(short))

    by_hash: dict[str, list[str]] = {}
    for r in records:
        by_hash.setdefault(r.sha256, []).append(r.path)
    report = {
        # DVC's directory hash when DVC tracks the data, else the hash of every file's path and bytes
        "fingerprint": dvc_hash or fingerprint(records),
        "content_sha256": fingerprint(records),
        "source": describe(cfg),
        "classes": labels,
        "num_images": len(records),
        "counts": counts,
        "duplicates": [group for group in by_hash.values() if len(group) > 1],
        "warnings": small_split_warnings(counts),
        "ignored_files": ignored,
        "excluded": [{"path": p.relative_to(source).as_posix(), "reason": r} for p, r in invalid],
        "config": {**cfg.model_dump(mode="json"), "repo": redact(cfg.repo)},
        **({"source_version": version} if version else {}),
    }
    draft.write([dataclasses.replace(r, split=splits[r.path]) for r in records], report, where)
    if where["kind"] == "s3":  # what was downloaded to check it is what the steps on this machine read
        for r in records:
            cache.keep(source / r.path, r.sha256)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: data)")
    parser.add_argument("--source", help="ImageFolder dataset; overrides data.source")
    parser.add_argument("--out", required=True, help="folder for the dataset artifact")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).data
    report = prepare(args.source or cfg.source, args.out, cfg)
    for warning in report["warnings"]:
        print(f"data: warning: {warning}", file=sys.stderr)
    print(f"data: {report['num_images']} images, {len(report['classes'])} classes, "
          f"fingerprint {report['fingerprint'][:12]}")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)

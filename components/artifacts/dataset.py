"""The dataset artifact (components.data writes it; every later step reads it).

    manifest.csv            path (inside the source), label, split, sha256, width, height per image
    report.json             counts per class and split, the data fingerprint, the config used
    source.json             where the images are:
        folder     `location` is the folder read (the path as configured); images are read in place
        s3         `location` is s3://bucket/prefix/; a step fetches only the images it uses into the
                   content cache ($FINETUNE_CACHE/sha256/<digest>)
        artifact   the images were copied into `images/` here (sources whose credentials the later
                   steps do not have: a DVC-tracked git repository)
    images/<class>/<file>   only for a DVC-tracked source: byte-for-byte copies

The manifest's sha256 makes every reference immutable: every image a later step reads through
`load` is checked against it, so an image that changed after the data step read it is refused,
never trained on.
"""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from components.storage import cache
from components.storage.atomic import atomic_dir, atomic_file, drafted, read_json, write_csv, write_json
from components.storage.images import decode

MANIFEST, REPORT, SOURCE, IMAGES = "manifest.csv", "report.json", "source.json", "images"
COLUMNS = ("path", "label", "split", "sha256", "width", "height")


class DatasetError(ValueError):
    """An image the manifest names cannot be had as it was; the message names it and why."""


@dataclass(frozen=True)
class Row:
    path: str       # "<class>/<path inside the class folder>", POSIX separators
    label: str
    split: str
    sha256: str
    width: int
    height: int


class Image(NamedTuple):
    """An image of the dataset where a step can read it: the local file, its class, its digest."""
    path: Path
    label: str
    sha256: str


class Draft:
    """The artifact being written (inside `publish`): `images` for the copies, then `write`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.images = folder / IMAGES

    def write(self, rows: list[Row], report: dict, where: dict) -> None:
        _write_manifest(self.folder, rows)
        write_json(self.folder / REPORT, report)
        write_json(self.folder / SOURCE, where)


def publish(out: str | Path):
    """`with publish(out) as draft:` the artifact appears at `out` whole when the block ends, or not at all."""
    return drafted(out, Draft)


def read_report(folder: str | Path) -> dict:
    return read_json(Path(folder) / REPORT)


def classes(folder: str | Path) -> list[str]:
    return read_report(folder)["classes"]


def rows(folder: str | Path, split: str) -> list[Row]:
    """The manifest rows of one split, in order."""
    with open(Path(folder) / MANIFEST, newline="") as f:
        return [Row(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]))
                for r in csv.DictReader(f) if r["split"] == split]


def images(folder: str | Path, split: str, pick=None) -> list[Image]:
    """Every image of one split (or those `pick` chooses from its rows), in manifest order, where this
    machine can read it: in place, in the artifact, or fetched from S3 into the content cache."""
    folder = Path(folder)
    chosen = rows(folder, split)
    chosen = pick(chosen) if pick else chosen
    where = read_json(folder / SOURCE) if (folder / SOURCE).exists() else {"kind": "artifact"}
    if where["kind"] == "artifact":
        paths = [folder / IMAGES / r.path for r in chosen]
    elif where["kind"] == "folder":
        paths = [Path(where["location"]) / r.path for r in chosen]
    else:
        paths = _fetch_s3(where["location"], chosen)
    return [Image(p, r.label, r.sha256) for p, r in zip(paths, chosen)]


def read_bytes(image: Image) -> bytes:
    """The image's bytes, refused when they are not the ones the data step read."""
    try:
        data = image.path.read_bytes()
    except OSError as err:
        raise DatasetError(f"dataset: {image.path}: cannot read it ({err.strerror or err})") from None
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise DatasetError(f"dataset: {image.path} changed after the data step read it (manifest sha256 "
                           f"{image.sha256[:12]}): run the pipeline again")
    return data


def load(image: Image):
    """The image as an upright RGB PIL image, its bytes checked first."""
    return decode(read_bytes(image))


def all_rows(folder: str | Path) -> list[Row]:
    """Every manifest row, in order."""
    return [r for split in ("train", "val", "test") for r in rows(folder, split)]


def subset(folder: str | Path, out: str | Path, keep) -> None:
    """A copy of the artifact at `out` whose manifest holds only the rows `keep(row)` accepts (the
    images, where copied, stay), for measuring how results change with the training set's size."""
    import shutil

    with atomic_dir(out) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _write_manifest(tmp, [r for r in all_rows(folder) if keep(r)])


def _write_manifest(folder: Path, manifest: list[Row]) -> None:
    write_csv(folder / MANIFEST, COLUMNS, ([r.path, r.label, r.split, r.sha256, r.width, r.height] for r in manifest))


def record_files(folder: str | Path) -> list[Path]:
    """What MLflow keeps of this artifact."""
    return [Path(folder) / REPORT]


def _fetch_s3(location: str, chosen: list[Row]) -> list[Path]:
    """The cached copy of each row's object, downloading the missing ones (8 at a time)."""
    import botocore.exceptions

    from components.storage.sources import s3_client, s3_prefix

    bucket, prefix = s3_prefix(location)
    s3 = s3_client()
    root = cache.blobs()

    def fetch(row: Row) -> Path:
        path = root / row.sha256
        if path.is_file():
            return path
        uri = f"s3://{bucket}/{prefix}{row.path}"
        try:
            body = s3.get_object(Bucket=bucket, Key=prefix + row.path)["Body"].read()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise DatasetError(f"dataset: {uri}: cannot read it ({err})") from None
        if hashlib.sha256(body).hexdigest() != row.sha256:
            raise DatasetError(f"dataset: {uri} changed after the data step read it (manifest sha256 "
                               f"{row.sha256[:12]}): run the pipeline again")
        with atomic_file(path) as tmp:
            tmp.write_bytes(body)
        return path

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fetch, chosen))

"""Where a dataset comes from: a local folder, a DVC-tracked path of a git repository at a
revision, or an S3 prefix. Remote datasets are copied into a staging folder first; every path
that would land outside it (`../`, absolute keys) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path, PurePosixPath

from components.config import DataConfig
from components.redaction import redact


class SourceError(ValueError):
    """The dataset could not be fetched; the message names the setting or object and why."""


def safe_join(root: Path, relative: str, what: str) -> Path:
    """`root`/`relative`, refusing any `relative` that would escape `root`."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if not parts or relative.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise SourceError(f"{what}: refused: '{relative}' would be written outside {root}")
    return root.joinpath(*parts)


def git_url(repo: str) -> str:
    """`repo` with the login that netrc (`$NETRC`, else ~/.netrc) holds for its host, for an https:// repository
    given without one: on a cluster the token comes from a Secret mounted as a netrc file, never from
    data.repo, which every pipeline parameter shows. requests reads netrc itself (https weights); DVC's git
    client does not."""
    import netrc
    import os
    from urllib.parse import quote, urlsplit

    parts = urlsplit(repo)
    if parts.scheme != "https" or "@" in parts.netloc or not parts.hostname:
        return repo
    try:
        login = netrc.netrc(os.environ.get("NETRC") or None).authenticators(parts.hostname)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):  # no netrc: no login, as git without one
        return repo
    if not login:
        return repo
    user, _, password = login
    return parts._replace(netloc=f"{quote(user or '', safe='')}:{quote(password or '', safe='')}@{parts.netloc}").geturl()


def describe(cfg: DataConfig) -> str:
    """The source as MLflow records it: repo@rev:path, an S3 URI, or a local path."""
    if cfg.repo:
        return f"{redact(cfg.repo)}@{cfg.rev or 'HEAD'}:{cfg.source}"
    return cfg.source


def pin(cfg: DataConfig) -> str:
    """The version of what the source holds now, cheaply and without reading an image: the commit `data.rev` points
    at (`git:<sha>`), a hash of the S3 prefix's keys, ETags and sizes (`s3:<sha256>`), or of a local
    folder's paths, sizes and modification times (`files:<sha256>`). Equal versions, equal content."""
    if cfg.repo:
        from dvc.api import DVCFileSystem

        try:
            return "git:" + DVCFileSystem(git_url(cfg.repo), rev=cfg.rev or None).repo.get_rev()
        except Exception as err:  # scmrepo and dulwich raise many kinds; the message names the source
            raise SourceError(f"data.repo/data.rev: cannot resolve {describe(cfg)}: {type(err).__name__}: "
                              f"{redact(str(err).replace(cfg.repo, redact(cfg.repo)))}") from None
    if cfg.source.startswith("s3://"):
        return _listing_version(_s3_listing(cfg.source))
    _check_scheme(cfg.source)
    root = Path(cfg.source)
    if not root.is_dir():
        raise SourceError(f"data.source: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return "files:" + _digest(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}"
                              for p in files)


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def _check_scheme(source: str) -> None:
    if "://" in source and not source.startswith("s3://"):
        raise SourceError(f"data.source: {source}: unsupported scheme (a path, s3://, or data.repo for DVC)")


def materialize(cfg: DataConfig, staging: Path, expect: str = "") -> tuple[Path, str | None]:
    """A local folder holding the dataset, and DVC's hash of it when DVC tracks it.

    `expect`: the version (`pin`) this run resolved; for a DVC source it is the commit read, for
    the others the fetch fails when the source no longer holds that version."""
    if cfg.repo:
        if expect:
            cfg = cfg.model_copy(update={"rev": expect.removeprefix("git:")})
        return _from_dvc(cfg, staging)
    _check_scheme(cfg.source)
    if cfg.source.startswith("s3://"):
        return _from_s3(cfg.source, staging, expect), None
    if expect and (now := pin(cfg)) != expect:
        raise SourceError(f"data.source: {cfg.source}: changed since this run resolved it ({expect[:18]}, "
                          f"now {now[:18]}); run again")
    return Path(cfg.source), None


def _from_dvc(cfg: DataConfig, staging: Path) -> tuple[Path, str | None]:
    from dvc.api import DVCFileSystem

    where = describe(cfg)
    try:
        fs = DVCFileSystem(git_url(cfg.repo), rev=cfg.rev or None)
        info = fs.info(cfg.source)
        if info.get("type") != "directory":
            raise SourceError(f"data.source: {where} is not a directory")
        fs.get(cfg.source.rstrip("/") + "/", str(staging), recursive=True)
    except SourceError:
        raise
    except Exception as err:  # DVC and scmrepo raise many kinds; the message names the source either way
        raise SourceError(f"data.repo/data.rev/data.source: cannot read {where}: {type(err).__name__}: "
                          f"{redact(str(err).replace(cfg.repo, redact(cfg.repo)))}") from None
    dvc_hash = (info.get("dvc_info") or {}).get("md5") or info.get("md5")
    return staging, dvc_hash


@contextlib.contextmanager
def _s3_errors(uri: str):
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as err:
        raise SourceError(f"data.source: {uri}: {err.response['Error'].get('Code')}: "
                          f"{err.response['Error'].get('Message')}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise SourceError(f"data.source: {uri}: {err}") from None


def s3_client():
    import boto3

    return boto3.session.Session().client("s3")  # endpoint and keys from the environment as it is now


def s3_prefix(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in / or empty) of s3://bucket/prefix."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.rstrip("/") + "/" if prefix else ""


def _listing_version(listing: list[tuple[str, str, int]]) -> str:
    return "s3:" + _digest(f"{key}\t{etag}\t{size}" for key, etag, size in listing)


def _s3_listing(uri: str, s3=None) -> list[tuple[str, str, int]]:
    """(key relative to the prefix, ETag, size) of every object under the prefix, folder markers left out."""
    bucket, prefix = s3_prefix(uri)
    s3 = s3 or s3_client()
    with _s3_errors(uri):
        listing = [(obj["Key"][len(prefix):], obj["ETag"].strip('"'), obj["Size"])
                   for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                   for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    if not listing:
        raise SourceError(f"data.source: {uri}: no objects under this prefix")
    return sorted(listing)


def _from_s3(uri: str, staging: Path, expect: str = "") -> Path:
    """Every object under the prefix, each fetched at the ETag the listing saw; with `expect`, the
    listing must be that version."""
    bucket, prefix = s3_prefix(uri)
    s3 = s3_client()
    listing = _s3_listing(uri, s3)
    now = _listing_version(listing)
    if expect and now != expect:
        raise SourceError(f"data.source: {uri}: changed since this run resolved it ({expect[:18]}, "
                          f"now {now[:18]}); run again")
    with _s3_errors(uri):
        for key, etag, _ in listing:
            dest = safe_join(staging, key, f"data.source: s3://{bucket}/{prefix}{key}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            body = s3.get_object(Bucket=bucket, Key=prefix + key, IfMatch=f'"{etag}"')["Body"]
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    f.write(chunk)
    return staging

"""Where a dataset comes from: a local folder, a DVC-tracked path of a git repository at a
revision, or an S3 prefix. Remote datasets are copied into a staging folder first; every path
that would land outside it (`../`, absolute keys) is refused.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from components.config import DataConfig


class SourceError(ValueError):
    """The dataset could not be fetched; the message names the setting or object and why."""


def safe_join(root: Path, relative: str, what: str) -> Path:
    """`root`/`relative`, refusing any `relative` that would escape `root`."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if not parts or relative.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise SourceError(f"{what}: refused: '{relative}' would be written outside {root}")
    return root.joinpath(*parts)


def redact(url: str) -> str:
    """`url` without any user:password@ part, so a token in a repository URL never reaches a log,
    a report or MLflow."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url


def describe(cfg: DataConfig) -> str:
    """The source as MLflow records it: repo@rev:path, an S3 URI, or a local path."""
    if cfg.repo:
        return f"{redact(cfg.repo)}@{cfg.rev or 'HEAD'}:{cfg.source}"
    return cfg.source


def materialize(cfg: DataConfig, staging: Path) -> tuple[Path, str | None]:
    """A local folder holding the dataset, and DVC's hash of it when DVC tracks it."""
    if cfg.repo:
        return _from_dvc(cfg, staging)
    if cfg.source.startswith("s3://"):
        return _from_s3(cfg.source, staging), None
    if "://" in cfg.source:
        raise SourceError(f"data.source: {cfg.source}: unsupported scheme (a path, s3://, or data.repo for DVC)")
    return Path(cfg.source), None


def _from_dvc(cfg: DataConfig, staging: Path) -> tuple[Path, str | None]:
    from dvc.api import DVCFileSystem

    where = describe(cfg)
    try:
        fs = DVCFileSystem(cfg.repo, rev=cfg.rev or None)
        info = fs.info(cfg.source)
        if info.get("type") != "directory":
            raise SourceError(f"data.source: {where} is not a directory")
        fs.get(cfg.source.rstrip("/") + "/", str(staging), recursive=True)
    except SourceError:
        raise
    except Exception as err:  # DVC and scmrepo raise many kinds; the message names the source either way
        raise SourceError(f"data.repo/data.rev/data.source: cannot read {where}: {type(err).__name__}: "
                          f"{str(err).replace(cfg.repo, redact(cfg.repo))}") from None
    dvc_hash = (info.get("dvc_info") or {}).get("md5") or info.get("md5")
    return staging, dvc_hash


def _from_s3(uri: str, staging: Path) -> Path:
    import boto3
    import botocore.exceptions

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.session.Session().client("s3")  # endpoint and keys from the environment as it is now
    count = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # folder markers
                dest = safe_join(staging, obj["Key"][len(prefix):], f"data.source: s3://{bucket}/{obj['Key']}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(dest))
                count += 1
    except botocore.exceptions.ClientError as err:
        raise SourceError(f"data.source: {uri}: {err.response['Error'].get('Code')}: "
                          f"{err.response['Error'].get('Message')}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise SourceError(f"data.source: {uri}: {err}") from None
    if not count:
        raise SourceError(f"data.source: {uri}: no objects under this prefix")
    return staging

"""Where pretrained weights come from, and the local cache that keeps them.

    zoo/model.pt, file:///abs/model.pt                a local file, used in place
    torchvision://<arch>?weights=<NAME>                torchvision's weights API; torch.hub's cache
                                                       ($TORCH_HOME/hub/checkpoints) under its file name
    timm://<model>[.<tag>]                             timm's pretrained weights for <model>, from the
                                                       Hugging Face hub's cache ($HF_HOME/hub; offline
                                                       with HF_HUB_OFFLINE=1)
    timm://<model>?weights=<uri>                       a timm <model> with weights from any URI here
    hf-hub://<org>/<repo>                              a timm-format repository on the Hugging Face hub
                                                       (config.json names the architecture)
    https://host/path/model.pt                         needs pretrained.sha256
    s3://bucket/key                                    boto3; endpoint from AWS_ENDPOINT_URL, keys from
                                                       the environment
    models:/<name>@<alias>, models:/<name>/<version>   the checkpoint of a version in the MLflow registry

Downloads go to a content-addressed cache ($FINETUNE_CACHE, default ~/.cache/finetune-pipeline):
`sha256/<digest>` holds the bytes and `index.json` maps immutable sources (an https URL with its pin,
an S3 object at its ETag, a registry version) to digests, so a repeated run fetches nothing. Every
download streams to a temporary file, is checked against the size limit and the pin, and only
then is renamed into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from components.storage import cache
from components.storage.atomic import atomic_file, sha256_file
from components.redaction import redact

CHUNK = 1 << 20


class FetchError(ValueError):
    """The weights could not be fetched or trusted; the message names the URI and why."""


def _store(chunks, uri: str, max_bytes: int, pin: str, key: str | None) -> Path:
    """Stream `chunks` into the cache: size-limited, verified against `pin`, renamed only when complete."""
    root = cache.blobs()
    digest, size = hashlib.sha256(), 0
    fd, name = tempfile.mkstemp(prefix=".download-", dir=root)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"pretrained.uri: {uri}: larger than pretrained.max_size_mb "
                                     f"({max_bytes / 2**20:.0f} MiB); download stopped")
                digest.update(chunk)
                f.write(chunk)
        sha = digest.hexdigest()
        if pin and sha != pin:
            raise FetchError(f"pretrained.sha256 mismatch for {uri}: pinned {pin}, downloaded file has {sha}")
        final = root / sha
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if key:
        cache.remember(key, sha)
    return final


def _check_size(uri: str, size: int | None, max_bytes: int) -> None:
    if size is not None and size > max_bytes:
        raise FetchError(f"pretrained.uri: {uri}: {size / 2**20:.1f} MiB is larger than pretrained.max_size_mb "
                         f"({max_bytes / 2**20:.0f} MiB)")


def _torchvision(uri: str, arch: str, max_bytes: int) -> tuple[Path, list[str] | None]:
    import torch
    import torchvision

    parsed = urlparse(uri)
    names = parse_qs(parsed.query).get("weights", [])
    if len(names) != 1:
        raise FetchError(f"pretrained.uri: {uri}: expected torchvision://<arch>?weights=<NAME>")
    if parsed.netloc != arch:
        raise FetchError(f"pretrained.uri names architecture '{parsed.netloc}' but pretrained.arch is '{arch}'")
    try:
        weights = torchvision.models.get_model_weights(parsed.netloc)[names[0]]
    except (ValueError, KeyError) as err:
        raise FetchError(f"pretrained.uri: {uri}: torchvision has no such weights ({err})") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    # torchvision's file names end in the first hex digits of the file's SHA-256 (torch.hub.HASH_REGEX), which
    # torch.hub checks only when it downloads: a file already in the cache is checked here, every time.
    known = torch.hub.HASH_REGEX.search(cached.name)
    if not cached.exists():
        try:
            with atomic_file(cached) as tmp:  # a broken download never stays in the cache
                torch.hub.download_url_to_file(weights.url, str(tmp), hash_prefix=known and known.group(1),
                                               progress=True)
        except Exception as err:
            raise FetchError(f"pretrained.uri: {uri}: not in {cached.parent} and download of {weights.url} "
                             f"failed ({type(err).__name__}: {err})") from None
    _check_size(uri, cached.stat().st_size, max_bytes)
    if known and not sha256_file(cached).startswith(known.group(1)):
        raise FetchError(f"pretrained.uri: {uri}: {cached} does not have the SHA-256 its name says "
                         f"({known.group(1)}...): a damaged or substituted file; delete it and fetch it again")
    return cached, list(weights.meta.get("categories") or []) or None


MAX_REDIRECTS = 5


def _https(uri: str, pin: str, max_bytes: int) -> Path:
    """Download with requests, which sends basic-auth credentials to the URI's own host only: a redirect
    to another host (or port, or scheme) goes without them. Every hop must be https://."""
    import requests
    from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

    if not pin:
        raise FetchError(f"pretrained.sha256: required for {uri}: an https:// download is trusted only when pinned")
    if cached := cache.cached(pin):
        return cached

    def https_only(response, *args, **kwargs):  # requests calls it for every response, redirects included
        if response.is_redirect:
            target = urljoin(response.url, response.headers["location"])
            if urlsplit(target).scheme != "https":
                raise FetchError(f"pretrained.uri: {uri}: redirected to {target}: only https:// is followed")

    url = ""
    try:
        parts = urlsplit(uri)
        # https://user:token@host/...: the credential goes as HTTP basic auth, never in the URL
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=host))
        auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username is not None else None
        with requests.Session() as session:
            session.max_redirects = MAX_REDIRECTS
            session.hooks["response"].append(https_only)
            # a CA bundle given the way OpenSSL and urllib take it (SSL_CERT_FILE) counts, then requests' own
            verify = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE") or True
            with session.get(url, auth=auth, stream=True, timeout=60, verify=verify) as response:
                response.raise_for_status()
                length = response.headers.get("Content-Length")
                _check_size(uri, int(length) if length else None, max_bytes)
                return _store(response.iter_content(CHUNK), uri, max_bytes, pin, key=None)
    except FetchError:
        raise
    except (requests.RequestException, OSError, ValueError) as err:  # ValueError: a malformed URL or port
        # urllib3 names the request by its path and query ("Max retries exceeded with url: /m.pt?sig=..."),
        # which no URI pattern finds: those go redacted here
        detail = str(err)
        if url:
            request = url.split("/", 3)[3] if url.count("/") >= 3 else ""
            detail = detail.replace(f"/{request}", redact(f"https://h/{request}").removeprefix("https://h"))
        raise FetchError(f"pretrained.uri: {uri}: download failed ({type(err).__name__}: {detail})") from None


def _s3(uri: str, pin: str, max_bytes: int, etag: str = "") -> Path:
    """The object, at `etag` when given (the one resolve pinned: another is refused, not fetched)."""
    import boto3
    import botocore.exceptions

    if cached := cache.cached(pin):
        return cached
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise FetchError(f"pretrained.uri: {uri}: expected s3://<bucket>/<key>")
    # A fresh session: endpoint (AWS_ENDPOINT_URL) and keys come from the environment as it is now,
    # not as boto3's default session cached them earlier in this process.
    s3 = boto3.session.Session().client("s3")
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        now = head["ETag"].strip('"')
        if etag and now != etag:
            raise FetchError(f"pretrained.uri: {uri}: changed since this run resolved it (etag:{etag}, now "
                             f"etag:{now}); run again")
        _check_size(uri, head["ContentLength"], max_bytes)
        index_key = f"{uri}#etag={now}"
        if cached := cache.lookup(index_key):
            return cached
        body = s3.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]
        return _store(body.iter_chunks(CHUNK), uri, max_bytes, pin, key=index_key)
    except botocore.exceptions.ClientError as err:
        raise FetchError(f"pretrained.uri: {uri}: {err.response['Error'].get('Code')}: "
                         f"{err.response['Error'].get('Message')}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise FetchError(f"pretrained.uri: {uri}: {err}") from None


def imagenet_names(num_classes: int) -> list[str] | None:
    """ImageNet-1k's class names, as torchvision writes them ("tench", "goldfish", ...)."""
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    return [d.split(",")[0] for d in ImageNetInfo("imagenet-1k").label_descriptions()]


def _revision(uri: str) -> str | None:
    """The hub commit a resolved URI pins (`?revision=<commit>`, what resolve records); None: the newest."""
    return parse_qs(urlparse(uri).query).get("revision", [None])[0]


def _hub_weights(repo: str, uri: str) -> Path:
    """The weights file of a Hugging Face hub repository at the URI's revision: from the hub's cache,
    downloaded into it only where the hub can be reached (not with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    for filename in ("model.safetensors", "pytorch_model.bin"):  # what timm's hub loading looks for
        try:
            return Path(hf_hub_download(repo, filename, revision=_revision(uri)))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise FetchError(f"pretrained.uri: {uri}: {repo}: {type(err).__name__}: {err}") from None
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    raise FetchError(f"pretrained.uri: {uri}: no weights of {repo} (model.safetensors or pytorch_model.bin) in "
                     f"the Hugging Face cache {HF_HUB_CACHE}" + (" and HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE
                                                                  else " nor on the hub"))


def _timm(uri: str, arch: str, pin: str, max_bytes: int, version: str) -> tuple[Path, list[str] | None, str]:
    """timm://<model>[.<tag>]: timm's pretrained weights from the hub; ?weights=<uri>: from that URI."""
    import timm

    parsed = urlparse(uri)
    model = parsed.netloc + parsed.path
    if model.split(".")[0] != arch:
        raise FetchError(f"pretrained.uri names architecture '{model.split('.')[0]}' but pretrained.arch is '{arch}'")
    inner = parse_qs(parsed.query).get("weights", [])
    if inner:
        if "://" in inner[0] and inner[0].split("://")[0] in ("timm", "hf-hub", "torchvision"):
            raise FetchError(f"pretrained.uri: {uri}: ?weights= names a file, s3://, https:// or models:/ URI")
        path, names, source = local_file(inner[0], arch, pin, max_bytes, version)
        return path, names, f"timm://{model}?weights={source}"
    cfg = timm.models.get_pretrained_cfg(model) if timm.is_model(arch) else None
    if cfg is None or not cfg.hf_hub_id:
        raise FetchError(f"pretrained.uri: {uri}: timm has no Hugging Face hub weights for '{model}'; give a file or "
                         f"URI as timm://{model}?weights=<uri>")
    path = _hub_weights(cfg.hf_hub_id, uri)
    _check_size(uri, path.stat().st_size, max_bytes)
    return path, imagenet_names(cfg.num_classes), f"timm://{model}?revision={path.parent.name}"


def _hf_hub(uri: str, arch: str, max_bytes: int) -> tuple[Path, list[str] | None, str]:
    """hf-hub://<org>/<repo>: a timm-format repository (config.json: architecture, num_classes, label_names)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parsed = urlparse(uri)
    repo = (parsed.netloc + parsed.path).strip("/")
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=_revision(uri))).read_text())
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise FetchError(f"pretrained.uri: {uri}: no config.json of {repo} in the Hugging Face cache or on the hub "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if config.get("architecture") != arch:
        raise FetchError(f"pretrained.uri: {uri}: its config.json names architecture '{config.get('architecture')}' "
                         f"but pretrained.arch is '{arch}'")
    path = _hub_weights(repo, uri)
    _check_size(uri, path.stat().st_size, max_bytes)
    names = config.get("label_names") or imagenet_names(config.get("num_classes", 0))
    return path, list(names) if names else None, f"hf-hub://{repo}?revision={path.parent.name}"


def _registry(uri: str, pin: str, max_bytes: int) -> tuple[Path, str]:
    """The checkpoint of a registered version, and the immutable models:/<name>/<version> it resolved to."""
    import mlflow

    from components.tracking import store

    resolved = _registry_version(uri, store.client())
    if cached := (cache.cached(pin) or cache.lookup(resolved)):
        return cached, resolved
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(resolved, dst_path=tmp))
        except mlflow.exceptions.MlflowException as err:
            raise FetchError(f"pretrained.uri: {uri}: {err.message}") from None
        found = sorted(local.glob("artifacts/*.pt"))
        if len(found) != 1:
            raise FetchError(f"pretrained.uri: {uri}: {resolved} holds no pipeline checkpoint "
                             f"(artifacts/*.pt); it was not registered by this pipeline")
        _check_size(uri, found[0].stat().st_size, max_bytes)
        with open(found[0], "rb") as f:
            return _store(iter(lambda: f.read(CHUNK), b""), uri, max_bytes, pin, key=resolved), resolved


def _registry_version(uri: str, client) -> str:
    """models:/<name>/<version> for models:/<name>@<alias> (the version it points at now) or itself."""
    from components.tracking.registry import current_version

    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = current_version(client, name, alias)
        if version is None:
            raise FetchError(f"pretrained.uri: {uri}: no registered model '{name}' with alias '{alias}'")
        return f"models:/{name}/{version}"
    if rest.count("/") == 1:
        return uri
    raise FetchError(f"pretrained.uri: {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def _redacted_errors(fn):
    """FetchError messages with every URI in them redacted (a token in the URI never reaches a log)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FetchError as err:
            raise FetchError(redact(str(err))) from None
    return wrapper


@_redacted_errors
def timm_weights(uri: str) -> str:
    """The URI inside timm://<model>?weights=<uri>, or "" (timm's hub weights, or not a timm:// URI)."""
    return parse_qs(urlparse(uri).query).get("weights", [""])[0] if uri.startswith("timm://") else ""


def fixed_content(uri: str, sha256: str = "") -> bool:
    """Whether `uri` can only ever fetch the same bytes, known without asking anyone: a pin (fetch refuses
    other bytes), a torchvision weights name (its file name carries the hash) or a registry version number
    (immutable), also inside timm://<model>?weights=; not an S3 key, a registry alias or timm's hub, whose
    content can move under the same name (pin() asks those what they hold now)."""
    inner = timm_weights(uri) or uri
    return bool(sha256) or inner.startswith("torchvision://") or re.fullmatch(r"models:/[^/@]+/\d+", inner) is not None


def pin(uri: str, arch: str, sha256: str = "") -> tuple[str, str]:
    """The immutable URI to fetch and what identifies its content, without downloading it: a
    registry alias becomes its version (and that version's weights digest), an S3 object its ETag,
    a local file its SHA-256; a pin or a torchvision weights name (its file name carries a hash)
    identifies itself."""
    if sha256:
        return uri, f"sha256:{sha256}"
    if uri.startswith("torchvision://"):
        return uri, uri
    if timm_weights(uri):
        parsed = urlparse(uri)
        inner, content = pin(timm_weights(uri), arch)
        return f"timm://{parsed.netloc}{parsed.path}?weights={inner}", content
    if uri.startswith("https://"):
        raise FetchError(f"pretrained.sha256: required for {uri}: an https:// download is trusted only when pinned")
    if uri.startswith("models:/"):
        from components.tracking import store

        client = store.client()
        resolved = _registry_version(uri, client)
        name, number = resolved[len("models:/"):].split("/")
        try:
            tags = client.get_model_version(name, number).tags
        except Exception as err:  # MlflowException or the HTTP error behind it; the message names the URI
            raise FetchError(f"pretrained.uri: {uri}: {resolved}: {err}") from None
        return resolved, f"weights_sha256:{tags['weights_sha256']}" if "weights_sha256" in tags else resolved
    if uri.startswith("s3://"):
        import boto3
        import botocore.exceptions

        parsed = urlparse(uri)
        try:
            head = boto3.session.Session().client("s3").head_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise FetchError(f"pretrained.uri: {uri}: {err}") from None
        return uri, f"etag:{head['ETag'].strip(chr(34))}"
    path, _, _ = local_file(uri, arch, max_bytes=2**62)  # a local file: its bytes are its identity
    return uri, f"sha256:{sha256_file(path)}"


@_redacted_errors
def local_file(uri: str, arch: str, pin: str = "", max_bytes: int = 2**40,
               version: str = "") -> tuple[Path, list[str] | None, str]:
    """A local file holding `uri`'s weights (fetched into the cache when remote), class names when the zoo
    knows them, and the immutable source it came from. `version`: what `pin` resolved at the start of the
    run; an S3 object must still be at that ETag (the file's SHA-256 and the weights' digest the caller
    checks once it has them)."""
    if uri.startswith("torchvision://"):
        path, names = _torchvision(uri, arch, max_bytes)
        return path, names, uri
    if uri.startswith("timm://"):
        return _timm(uri, arch, pin, max_bytes, version)
    if uri.startswith("hf-hub://"):
        return _hf_hub(uri, arch, max_bytes)
    if uri.startswith("https://"):
        return _https(uri, pin, max_bytes), None, uri
    if uri.startswith("s3://"):
        return _s3(uri, pin, max_bytes, version.removeprefix("etag:") if version.startswith("etag:") else ""), \
            None, uri
    if uri.startswith("models:/"):
        path, resolved = _registry(uri, pin, max_bytes)
        return path, None, resolved
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):])
    elif "://" in uri:
        raise FetchError(f"pretrained.uri: {uri}: unsupported scheme "
                         "(use a path, file://, torchvision://, timm://, hf-hub://, https://, s3:// or models:/)")
    else:
        path = Path(uri)
    if not path.is_file():
        raise FetchError(f"pretrained.uri: {uri}: no such file {path}")
    return path, None, uri

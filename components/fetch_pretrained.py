"""fetch_pretrained: get pretrained weights from a model zoo URI, verify them, load them safely.

    python -m components.fetch_pretrained --params params.yaml --out artifacts/pretrained

URIs (components/models/zoo.py): a path or file://, torchvision://<arch>?weights=<NAME>, timm://<model>
(timm's hub weights, or ?weights=<uri>), hf-hub://<org>/<repo>, https:// (pinned), s3://bucket/key,
models:/<name>@<alias> or models:/<name>/<version>. pretrained.library says whose architecture
pretrained.arch is (torchvision or timm).

The SHA-256 of the fetched file is always recorded and checked when pretrained.sha256 pins it.
Files are loaded with safetensors or torch.load(weights_only=True): a pickle that would run code is refused.
Writes the weights artifact (components/artifacts/weights.py): the weights as a checkpoint and where
they came from.
"""

from __future__ import annotations

import argparse
# B403: only to catch pickle.UnpicklingError from torch.load(weights_only=True)
import pickle  # nosec B403
from pathlib import Path

import torch

from components.artifacts import checkpoint, weights
from components.config import PretrainedConfig, load_params
from components.models import architectures
from components.models.zoo import FetchError, local_file
from components.redaction import redact
from components.storage.atomic import sha256_file

__all__ = ["FetchError", "fetch"]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that much JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def safe_load(path: Path) -> object:
    if _is_safetensors(path):  # the hub's format: tensors and a JSON header, nothing that runs
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error kinds for a damaged file
            raise FetchError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise FetchError(f"{path}: refused to load: the file holds more than tensors and plain data, "
                         f"and unpickling it could run code ({str(err).splitlines()[0]})") from None
    except Exception as err:
        raise FetchError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def unpack(obj: object, path: Path, arch: str, library: str = "torchvision") -> tuple[dict, list[str] | None]:
    """State dict and class names from our checkpoint-v1, a plain state dict or a training checkpoint."""
    if checkpoint.is_checkpoint(obj):
        if obj["arch"] != arch:
            raise FetchError(f"{path}: checkpoint is a '{obj['arch']}' but pretrained.arch is '{arch}'")
        if obj.get("library", "torchvision") != library:
            raise FetchError(f"{path}: checkpoint is a {obj.get('library', 'torchvision')} network but "
                             f"pretrained.library is '{library}'")
        return obj["state_dict"], obj.get("class_names")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key], None
    raise FetchError(f"{path}: no state dict found (expected a dict of tensors)")


def fetch(cfg: PretrainedConfig, out: str | Path, version: str = "") -> dict:
    """Fetch, verify and safely load the weights of `cfg.uri`; write them to `out` as checkpoint-v1.

    `version`: the content id resolved at the start of the run (models.zoo.pin), enforced whatever its
    kind: a file's SHA-256, an S3 object's ETag, a registered version's weights digest."""
    path, class_names, source = local_file(cfg.uri, cfg.arch, cfg.sha256, int(cfg.max_size_mb * 2**20), version)
    sha256 = sha256_file(path)
    if cfg.sha256 and sha256 != cfg.sha256:
        raise FetchError(f"pretrained.sha256 mismatch for {redact(cfg.uri)}: pinned {cfg.sha256}, file {path} has "
                         f"{sha256}")
    if version.startswith("sha256:") and version != f"sha256:{sha256}":
        raise FetchError(f"pretrained.uri: {redact(cfg.uri)}: changed since this run resolved it ({version[:19]}, "
                         f"now sha256:{sha256[:12]}); run again")
    state_dict, names_in_file = unpack(safe_load(path), path, cfg.arch, cfg.library)
    digest = f"weights_sha256:{architectures.weights_digest(state_dict)}"
    if version.startswith("weights_sha256:") and version != digest:
        raise FetchError(f"pretrained.uri: {redact(cfg.uri)}: its weights are not those this run resolved "
                         f"({version[:27]}...); run again")
    num_classes = architectures.num_outputs(state_dict, cfg.arch, cfg.library)
    # fail now, not in finetune
    architectures.load_weights(architectures.build(cfg.arch, num_classes, cfg.library), state_dict, cfg.arch)
    class_names = names_in_file or class_names
    info = {
        "uri": redact(cfg.uri),  # a token in an https:// URL must not reach reports or MLflow
        "resolved_uri": redact(source),  # models:/name@alias -> the version it pointed at
        "sha256": sha256,
        "size_bytes": path.stat().st_size,
        "library": cfg.library,
        "arch": cfg.arch,
        "num_classes": num_classes,
        "class_names": class_names,
        "pinned": bool(cfg.sha256),
        **({"version": redact(version)} if version else {}),
    }
    weights.write(out, checkpoint.Checkpoint(cfg.arch, class_names, state_dict, library=cfg.library), info)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: pretrained)")
    parser.add_argument("--out", required=True, help="folder for weights.pt and pretrained.json")
    args = parser.parse_args(argv)
    info = fetch(load_params(args.params).pretrained, args.out)
    print(f"fetch_pretrained: {info['uri']} ({info['arch']}, {info['num_classes']} classes) sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)

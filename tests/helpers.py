"""Builders the tests share: configurations from params.yaml, small real datasets, checkpoints, ports,
DVC data repositories. (Fixtures are in conftest.py; tests import builders from here.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from components.config import load_params, override

ROOT = Path(__file__).resolve().parent.parent
PARAMS = load_params(ROOT / "params.yaml")
sys.path.insert(0, str(ROOT / "infra"))
from local_stack import free_port  # noqa: E402,F401  the stack's port picker, for the tests' servers

# What the unit tests hold constant, on top of params.yaml: plain training (none of the demo's
# freezing, re-initialising, schedule or checkpoints) in fp32 whatever `precision: auto` picks (the tests
# of precision ask for theirs), and a gate with no thresholds.
PLAIN_TRAINING = dict(freeze=[], freeze_until="", reinit=[], unfreeze=[], lr_groups=[], schedule="constant",
                      warmup_epochs=0, min_delta=0.0, checkpoint_dir="", optimizer="sgd", lr=0.01, batch_size=32,
                      max_epochs=10, patience=3, precision="fp32")
NO_THRESHOLDS = dict(min_accuracy=0.0, min_macro_f1=0.0, min_class_recall=0.0)


def config(section: str, **changes):
    """A section of the repository's params.yaml (`validate` and `register` by those names), changed."""
    model = {"validate": PARAMS.validation, "register": PARAMS.registry}.get(section) or getattr(PARAMS, section)
    return override(model, **changes)


def data_cfg(source, **changes):
    return config("data", **{"source": str(source), "repo": "", "rev": "", "classes": [], "workers": 1, **changes})


def policy_cfg(**changes):
    return config("augment", **changes)


def pretrained_cfg(uri, **changes):
    return config("pretrained", **{"uri": str(uri), "sha256": "", "arch": "resnet18", **changes})


def finetune_cfg(**changes):
    return config("finetune", **{**PLAIN_TRAINING, **changes})


def validate_cfg(**changes):
    return config("validate", **{**NO_THRESHOLDS, **changes})


def register_cfg(model_name: str, **changes):
    return config("register", model_name=model_name, **changes)


def tracking_cfg(experiment: str, **changes):
    return config("tracking", **{"experiment": experiment, "system_metrics": False, **changes})


def make_imagefolder(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """Learnable RGB images: each class a bright bar at its own row, plus noise."""
    rng = np.random.default_rng(seed)
    for k, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            row = (k * size) // len(counts)
            img[row: row + max(2, size // len(counts) // 2), :, :] = 255 - rng.integers(0, 40)
            Image.fromarray(img).save(root / label / f"img-{i:03d}.png")
    return root


def save_checkpoint(path: Path, arch: str, class_names: list[str], seed: int = 0) -> Path:
    """A zoo checkpoint (checkpoint-v1) of a randomly initialised torchvision model."""
    import torch

    from components.artifacts import checkpoint
    from components.models import architectures as models

    torch.manual_seed(seed)
    net = models.build(arch, len(class_names))
    torch.save({"format": checkpoint.FORMAT, "arch": arch, "class_names": class_names,
                "state_dict": net.state_dict()}, path)
    return path


POLICY = {"image_size": 16, "resize_scale": (0.9, 1.0), "hflip": 0.0, "preview_images": 2}
# A policy without randomness (the whole 16x16 image, no flip, rotation or jitter): runs that draw their
# random numbers differently (a prefix cache, processes sharing a batch) still see the same images.
STILL = {"image_size": 16, "resize_scale": (1.0, 1.0), "resize_ratio": (1.0, 1.0), "hflip": 0.0, "rotation": 0.0,
         "brightness": 0.0, "contrast": 0.0, "preview_images": 2}


def _run(cmd, cwd, env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def dvc_data_repo(repo: Path, endpoint: str, folder: str, versions) -> dict:
    """A git repository whose `folder` is tracked by DVC with an S3 remote at `endpoint`.

    `versions` is a list of (tag, write(folder_path)); each is added, committed, tagged and pushed.
    Afterwards the local cache and the data are deleted: the data can only come from the remote.
    Returns the environment for running dvc there.
    """
    import shutil

    repo.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "remote", "add", "-d", "store", "s3://data/dvcstore"], repo, env)
    _run(["dvc", "remote", "modify", "store", "endpointurl", endpoint], repo, env)
    for tag, write in versions:
        write(repo / folder)
        _run(["dvc", "add", folder], repo, env)
        _run([*git, "add", "-A"], repo, env)
        _run([*git, "commit", "-qm", tag], repo, env)
        _run([*git, "tag", tag], repo, env)
        _run(["dvc", "push"], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / folder)
    return env


def commit(repo: Path, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)


def repository_copy(dest: Path) -> Path:
    """This working tree (committed or not, minus ignored files) as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    commit(dest, "copy")
    return dest


def make_photo_folder(root: Path, per_class: int = 14, seed: int = 0) -> Path:
    """Real photographs in ImageFolder layout, of mixed sizes and formats: crops of the two photos
    scikit-learn ships (a temple in China, a flower) as JPEG, PNG, WebP, greyscale, RGBA, CMYK and
    EXIF-rotated files, 160 to 420 pixels wide."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    for label, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        photo = Image.fromarray(load_sample_image(name))  # 640 x 427
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w = int(rng.integers(160, 420))
            h = min(int(w * rng.uniform(0.6, 1.0)), photo.height)
            x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h + 1))
            crop, path = photo.crop((x, y, x + w, y + h)), root / label / f"{label}-{i:02d}"
            kind = i % 7
            if kind == 0:
                crop.save(path.with_suffix(".jpg"), quality=int(rng.integers(60, 95)))
            elif kind == 1:
                crop.save(path.with_suffix(".png"))
            elif kind == 2:
                crop.save(path.with_suffix(".webp"), quality=80)
            elif kind == 3:
                crop.convert("L").save(path.with_suffix(".jpg"))
            elif kind == 4:
                rgba = crop.convert("RGBA")
                rgba.putalpha(200)
                rgba.save(path.with_suffix(".png"))
            elif kind == 5:
                crop.convert("CMYK").save(path.with_suffix(".jpg"))
            else:  # stored sideways, upright by its EXIF orientation (6: rotate 90 degrees clockwise)
                exif = Image.Exif()
                exif[0x0112] = 6
                crop.transpose(Image.Transpose.ROTATE_90).save(path.with_suffix(".jpeg"), exif=exif)
    return root


def hub_cache(hf_home: Path, repo: str, files: dict[str, bytes], commit: str = "0" * 40) -> Path:
    """A Hugging Face hub cache under `hf_home` holding `repo` at `commit` (refs/main pointing at it) with
    `files`, laid out as huggingface_hub keeps it ($HF_HOME/hub/models--<org>--<name>/...): what a machine
    that downloaded the repository once has, read with HF_HUB_OFFLINE=1."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def safetensors_bytes(state_dict: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})


def serve_https(tmp_path: Path, handler) -> tuple:
    """A real HTTPS server on loopback (self-signed certificate for 127.0.0.1) running `handler`, in a
    thread. Returns (server, base URL, certificate file to trust through SSL_CERT_FILE)."""
    import http.server
    import ssl
    import threading

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}", tmp_path / "cert.pem"


@contextlib.contextmanager
def tmpfs(folder: Path, options: str = "size=1m"):
    """A real small (or read-only: "size=1m,ro") file system mounted at `folder` for the test; needs
    root, as in CI: elsewhere the test is skipped."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torchvision

from components.models import architectures as models
from components.fetch_pretrained import FetchError, fetch
from helpers import pretrained_cfg, save_checkpoint


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def zoo_file(tmp_path):
    return save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b", "c", "d"])


@pytest.mark.parametrize("form", ["path", "file_uri"])
def test_local_checkpoint_is_fetched_and_its_sha256_recorded(zoo_file, tmp_path, form):
    uri = str(zoo_file) if form == "path" else f"file://{zoo_file}"
    info = fetch(pretrained_cfg(uri=uri, arch="resnet18"), tmp_path / "out")
    assert info["sha256"] == _sha(zoo_file)
    assert info["num_classes"] == 4 and info["class_names"] == ["a", "b", "c", "d"]
    ckpt = torch.load(tmp_path / "out" / "weights.pt", weights_only=True)
    original = torch.load(zoo_file, weights_only=True)["state_dict"]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in original.items())


def test_matching_pin_passes_and_mismatch_is_a_clear_error(zoo_file, tmp_path):
    fetch(pretrained_cfg(uri=str(zoo_file), arch="resnet18", sha256=_sha(zoo_file)), tmp_path / "ok")
    wrong = "0" * 64
    with pytest.raises(FetchError, match=rf"pretrained.sha256 mismatch for .*zoo.pt: pinned {wrong}, file .* has "):
        fetch(pretrained_cfg(uri=str(zoo_file), arch="resnet18", sha256=wrong), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _place_in_torch_home(tmp_path, monkeypatch, name: str | None = None) -> Path:
    """A resnet18 state dict in $TORCH_HOME/hub/checkpoints, as torch.hub keeps a download; `name`: its
    file name (default: resnet18-<first 8 hex of its own SHA-256>.pth, as torchvision names its files)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / "weights.pth")
    final = folder / (name or f"resnet18-{_sha(folder / 'weights.pth')[:8]}.pth")
    (folder / "weights.pth").rename(final)
    return final


def test_torchvision_weights_load_from_torch_home_offline(tmp_path, monkeypatch):
    """The real torchvision path: the weights API names the file, torch.hub's cache holds it, its name's hash
    is checked. The real IMAGENET1K_V1 file cannot be had here, so the weights entry is one whose URL names
    the file this test made (a stand-in for torchvision's registry; its class names are the real entry's)."""
    cached = _place_in_torch_home(tmp_path, monkeypatch)
    real = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    entry = type("Weights", (), {"url": f"https://download.pytorch.org/models/{cached.name}", "meta": real.meta})
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: {"IMAGENET1K_V1": entry})
    info = fetch(pretrained_cfg(uri="torchvision://resnet18?weights=IMAGENET1K_V1", arch="resnet18"),
                 tmp_path / "out")
    assert info["sha256"] == _sha(cached)
    assert info["num_classes"] == 1000
    assert info["class_names"][:2] == ["tench", "goldfish"]  # from the weights' own metadata


def test_a_torchvision_file_whose_bytes_do_not_have_the_hash_its_name_says_is_refused(tmp_path, monkeypatch):
    """torch.hub checks a download's hash only while downloading; a file already in the cache (another
    file under the official name, a damaged one) is checked here on every run."""
    official = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)  # resnet18-f37072fd.pth
    cached = _place_in_torch_home(tmp_path, monkeypatch, name=official)
    with pytest.raises(FetchError, match=r"does not have the SHA-256 its name says \(f37072fd\.\.\.\): a damaged or "
                                         r"substituted file; delete it and fetch it again"):
        fetch(pretrained_cfg(uri="torchvision://resnet18?weights=IMAGENET1K_V1", arch="resnet18"), tmp_path / "out")
    assert cached.exists() and not (tmp_path / "out").exists()


def test_torchvision_weights_missing_offline_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))  # no internet here
    with pytest.raises(FetchError, match=r"not in .*torch-home/hub/checkpoints and download of .* failed"):
        fetch(pretrained_cfg(uri="torchvision://resnet18?weights=IMAGENET1K_V1", arch="resnet18"), tmp_path / "o")
    assert not any((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())  # nothing half-written cached


def test_unknown_torchvision_weights_are_named(tmp_path):
    with pytest.raises(FetchError, match="torchvision has no such weights"):
        fetch(pretrained_cfg(uri="torchvision://resnet18?weights=NOPE", arch="resnet18"), tmp_path / "o")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(FetchError, match="refused to load"):
        fetch(pretrained_cfg(uri=str(evil), arch="resnet18"), tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_list_the_mismatched_layers(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(models.WeightsError, match=r"do not match architecture 'resnet18': unexpected: layer1.2"):
        fetch(pretrained_cfg(uri=str(tmp_path / "r34.pt"), arch="resnet18"), tmp_path / "out")


def test_unsupported_scheme_is_named(tmp_path):
    with pytest.raises(FetchError, match=r"pretrained.uri: ftp://x/y.pt: unsupported scheme"):
        fetch(pretrained_cfg(uri="ftp://x/y.pt", arch="resnet18"), tmp_path / "out")

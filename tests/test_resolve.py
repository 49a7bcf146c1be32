"""resolve: moving inputs pinned to immutable ones, against a real S3 server, a real DVC repository
and a real MLflow registry; and the data and fetch steps read exactly the resolved content."""

import os
import subprocess

import mlflow
import pytest
import torch

from components.data import prepare
from components.storage.sources import SourceError
from components.fetch_pretrained import FetchError, fetch
from components.resolve import resolve
from helpers import data_cfg, dvc_data_repo, make_imagefolder, pretrained_cfg, save_checkpoint


def _upload(client, folder, prefix):
    for path in sorted(folder.rglob("*.png")):
        client.upload_file(str(path), "data", f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_an_s3_prefix_resolves_to_its_listing_and_a_change_at_the_same_prefix_is_seen(s3_env, tmp_path):
    client, zoo = s3_env["client"], save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b"])
    _upload(client, make_imagefolder(tmp_path / "v1", {"circle": 12, "square": 12}), "nightly")
    source = data_cfg("s3://data/nightly", val_fraction=0.2, test_fraction=0.2, workers=1)
    first = resolve(source, pretrained_cfg(zoo))
    assert first == resolve(source, pretrained_cfg(zoo))  # unchanged content: the same values, a cache hit
    assert first["data_version"].startswith("s3:")

    v1 = prepare(source.source, tmp_path / "d1", source, first["data_version"])
    assert v1["source_version"] == first["data_version"]
    # Tonight's data lands at the same prefix: one image replaced, one class added.
    new = make_imagefolder(tmp_path / "v2", {"circle": 12, "square": 12, "triangle": 12}, seed=3)
    _upload(client, new, "nightly")
    second = resolve(source, pretrained_cfg(zoo))
    assert second["data_version"] != first["data_version"]
    assert second["pretrained_version"] == first["pretrained_version"]
    # A step holding the earlier version refuses the new content instead of mixing them up.
    with pytest.raises(SourceError, match=r"s3://data/nightly: changed since this run resolved it"):
        prepare(source.source, tmp_path / "stale", source, first["data_version"])
    assert not (tmp_path / "stale").exists()
    v2 = prepare(source.source, tmp_path / "d2", source, second["data_version"])
    assert v2["fingerprint"] != v1["fingerprint"] and v2["classes"] == ["circle", "square", "triangle"]


def test_a_local_folder_resolves_to_its_files(tmp_path):
    folder = make_imagefolder(tmp_path / "raw", {"circle": 10, "square": 10})
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b"])
    cfg = data_cfg(folder, val_fraction=0.2, test_fraction=0.2, workers=1)
    before = resolve(cfg, pretrained_cfg(zoo))
    assert before["data_version"].startswith("files:") and before["pretrained_version"].startswith("sha256:")
    (folder / "circle" / "extra.png").write_bytes((folder / "square" / os.listdir(folder / "square")[0]).read_bytes())
    assert resolve(cfg, pretrained_cfg(zoo))["data_version"] != before["data_version"]
    with pytest.raises(SourceError, match="changed since this run resolved it"):
        prepare(folder, tmp_path / "out", cfg, before["data_version"])


def test_a_dvc_revision_resolves_to_its_commit_and_data_reads_that_commit(s3_env, tmp_path):
    repo = tmp_path / "data-repo"
    dvc_data_repo(repo, s3_env["endpoint"], "images", [
        ("v1", lambda d: make_imagefolder(d, {"circle": 10, "square": 10})),
        ("v2", lambda d: make_imagefolder(d, {"circle": 10, "square": 10, "triangle": 10}, seed=5))])
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b"])
    cfg = data_cfg("images", repo=str(repo), rev="main", val_fraction=0.2, test_fraction=0.2, workers=1)
    subprocess.run(["git", "branch", "-f", "main", "v1"], cwd=repo, check=True)
    subprocess.run(["git", "checkout", "-q", "v2"], cwd=repo, check=True)
    pinned = resolve(cfg, pretrained_cfg(zoo))["data_version"]
    v1 = subprocess.run(["git", "rev-parse", "v1"], cwd=repo, check=True, capture_output=True, text=True)
    assert pinned == f"git:{v1.stdout.strip()}"
    subprocess.run(["git", "branch", "-f", "main", "v2"], cwd=repo, check=True)  # the branch moves on
    assert resolve(cfg, pretrained_cfg(zoo))["data_version"] != pinned
    report = prepare("images", tmp_path / "out", cfg, pinned)  # what the run resolved, not where main is now
    assert report["classes"] == ["circle", "square"]


def test_a_registry_alias_resolves_to_its_version_and_weights(mlflow_server, tmp_path, monkeypatch):
    from components.tracking.store import client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    registry = client()
    registry.create_registered_model("resolve-zoo")
    versions = []
    for digest in ("a" * 64, "b" * 64):
        with mlflow.start_run():
            mlflow.log_text("weights", "artifacts/model.pt")
            run_id = mlflow.active_run().info.run_id
        versions.append(registry.create_model_version("resolve-zoo", f"runs:/{run_id}/artifacts", run_id,
                                                      tags={"weights_sha256": digest}).version)
    registry.set_registered_model_alias("resolve-zoo", "champion", versions[0])
    cfg = data_cfg(make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5}))
    pretrained = pretrained_cfg("models:/resolve-zoo@champion")
    first = resolve(cfg, pretrained)
    assert (first["pretrained_uri"], first["pretrained_version"]) == \
        (f"models:/resolve-zoo/{versions[0]}", "weights_sha256:" + "a" * 64)
    registry.set_registered_model_alias("resolve-zoo", "champion", versions[1])
    moved = resolve(cfg, pretrained)
    assert (moved["pretrained_uri"], moved["pretrained_version"]) == \
        (f"models:/resolve-zoo/{versions[1]}", "weights_sha256:" + "b" * 64)


def test_fetch_refuses_a_file_that_changed_since_it_was_resolved(tmp_path):
    zoo = save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b"])
    resolved = resolve(data_cfg(make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})), pretrained_cfg(zoo))
    assert fetch(pretrained_cfg(zoo), tmp_path / "ok", resolved["pretrained_version"])["version"] == \
        resolved["pretrained_version"]
    save_checkpoint(zoo, "resnet18", ["a", "b"], seed=1)
    with pytest.raises(FetchError, match=r"zoo.pt: changed since this run resolved it"):
        fetch(pretrained_cfg(zoo), tmp_path / "stale", resolved["pretrained_version"])
    assert not (tmp_path / "stale").exists()


def test_fetch_refuses_an_s3_object_replaced_since_it_was_resolved(s3_env, tmp_path, monkeypatch):
    """resolve pins an S3 object to its ETag; the fetch takes that object or nothing (else Kubeflow would
    cache content B under the key of content A)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    client = s3_env["client"]
    client.upload_file(str(save_checkpoint(tmp_path / "a.pt", "resnet18", ["a", "b"])), "zoo", "moving.pt")
    cfg = pretrained_cfg("s3://zoo/moving.pt")
    resolved = resolve(data_cfg(make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})), cfg)
    assert resolved["pretrained_version"].startswith("etag:")
    client.upload_file(str(save_checkpoint(tmp_path / "b.pt", "resnet18", ["a", "b"], seed=1)), "zoo", "moving.pt")
    with pytest.raises(FetchError, match=r"s3://zoo/moving.pt: changed since this run resolved it \(etag:"):
        fetch(cfg, tmp_path / "stale", resolved["pretrained_version"])
    assert not (tmp_path / "stale").exists()
    again = resolve(data_cfg(tmp_path / "raw"), cfg)
    assert fetch(cfg, tmp_path / "now", again["pretrained_version"])["version"] == again["pretrained_version"]


def test_fetch_refuses_registered_weights_that_are_not_those_resolved(mlflow_server, tmp_path, monkeypatch):
    """A registry version's weights digest (its tag weights_sha256) is the pin: a checkpoint in the artifact
    store that holds other weights is refused."""
    from components.models import architectures
    from components.tracking.store import client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_server)
    registry = client()
    registry.create_registered_model("pinned-zoo")
    ours = save_checkpoint(tmp_path / "model.pt", "resnet18", ["a", "b"])
    (tmp_path / "other").mkdir()
    other = save_checkpoint(tmp_path / "other" / "model.pt", "resnet18", ["a", "b"], seed=1)
    digest = architectures.weights_digest(torch.load(ours, weights_only=True)["state_dict"])
    with mlflow.start_run():
        mlflow.log_artifact(str(other), "artifacts")  # the store holds other weights than the tag says
        run_id = mlflow.active_run().info.run_id
    version = registry.create_model_version("pinned-zoo", f"runs:/{run_id}", run_id,
                                            tags={"weights_sha256": digest}).version
    cfg = pretrained_cfg(f"models:/pinned-zoo/{version}")
    resolved = resolve(data_cfg(make_imagefolder(tmp_path / "raw", {"a": 5, "b": 5})), cfg)
    assert resolved["pretrained_version"] == f"weights_sha256:{digest}"
    with pytest.raises(FetchError, match=r"its weights are not those this run resolved \(weights_sha256:"):
        fetch(cfg, tmp_path / "pre", resolved["pretrained_version"])
    assert not (tmp_path / "pre").exists()

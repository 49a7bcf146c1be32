"""Datasets from S3 and from a DVC-tracked git repository, against a real SeaweedFS server."""

import csv
import subprocess

import pytest

from components.artifacts import dataset
from components.artifacts.dataset import DatasetError
from components.config import DataConfig
from components.data import prepare
from components.redaction import redact
from components.storage.sources import SourceError, describe, safe_join
from helpers import data_cfg, dvc_data_repo, make_imagefolder


def _cfg(source, **kw) -> DataConfig:
    return data_cfg(source=str(source), val_fraction=0.2, test_fraction=0.2, workers=1, **kw)


# SeaweedFS itself refuses object keys with `..` segments, so no key that climbs can be stored there;
# AWS S3 and others accept them, and every S3 key goes through safe_join before anything is written.
@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/etc/x.png", "C:/x.png", "a\\..\\..\\x.png"])
def test_paths_that_escape_the_destination_are_refused(tmp_path, key):
    with pytest.raises(SourceError, match="would be written outside"):
        safe_join(tmp_path, key, "data.source")


def test_s3_prefix_gives_the_same_dataset_as_the_local_folder(s3_env, image_folder, tmp_path):
    for path in image_folder.rglob("*.png"):
        s3_env["client"].upload_file(str(path), "data", f"shapes/v1/{path.relative_to(image_folder).as_posix()}")
    remote = prepare("s3://data/shapes/v1", tmp_path / "from-s3", _cfg("s3://data/shapes/v1"))
    local = prepare(image_folder, tmp_path / "local", _cfg(image_folder))
    assert remote["source"] == "s3://data/shapes/v1"
    assert remote["fingerprint"] == local["fingerprint"] and remote["counts"] == local["counts"]
    assert (tmp_path / "from-s3" / "manifest.csv").read_text() == (tmp_path / "local" / "manifest.csv").read_text()


def test_empty_or_unreadable_s3_prefix_is_named(s3_env, tmp_path, monkeypatch):
    with pytest.raises(SourceError, match=r"s3://data/nothing-here: no objects under this prefix"):
        prepare("s3://data/nothing-here", tmp_path / "out", _cfg("s3://data/nothing-here"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(SourceError, match=r"s3://data/shapes: SignatureDoesNotMatch"):
        prepare("s3://data/shapes", tmp_path / "out", _cfg("s3://data/shapes"))


@pytest.fixture
def data_repo(s3_env, tmp_path):
    """A git repository whose images are tracked by DVC and pushed to SeaweedFS: tags v1 and v2."""
    repo = tmp_path / "data-repo"
    env = dvc_data_repo(repo, s3_env["endpoint"], "images", [
        ("v1", lambda d: make_imagefolder(d, {"circle": 20, "square": 20})),
        ("v2", lambda d: make_imagefolder(d, {"circle": 25, "square": 25, "triangle": 20}, seed=5)),
    ])
    return repo, env


def test_dvc_push_and_pull_round_trip_through_the_s3_remote(data_repo):
    repo, env = data_repo
    subprocess.run(["dvc", "pull"], cwd=repo, env=env, check=True, capture_output=True)
    assert len(list((repo / "images").rglob("*.png"))) == 70


def test_dataset_at_a_git_revision_comes_from_the_dvc_remote(data_repo, tmp_path):
    repo, _ = data_repo
    v1 = prepare("images", tmp_path / "v1", data_cfg(source="images", repo=str(repo), rev="v1", workers=1,
                                                        val_fraction=0.2, test_fraction=0.2))
    v2 = prepare("images", tmp_path / "v2", data_cfg(source="images", repo=str(repo), rev="v2", workers=1,
                                                        val_fraction=0.2, test_fraction=0.2))
    assert v1["source"] == f"{repo}@v1:images" and v1["classes"] == ["circle", "square"]
    assert v1["num_images"] == 40 and v2["num_images"] == 70
    dvc_file = (repo / "images.dvc").read_text()  # v2's; v1's hash differs
    assert v2["fingerprint"] in dvc_file and v1["fingerprint"] != v2["fingerprint"]
    assert v1["fingerprint"].endswith(".dir")
    again = prepare("images", tmp_path / "v1-again", data_cfg(source="images", repo=str(repo), rev="v1",
                                                                workers=1, val_fraction=0.2, test_fraction=0.2))
    assert (tmp_path / "v1" / "manifest.csv").read_text() == (tmp_path / "v1-again" / "manifest.csv").read_text()
    assert again["fingerprint"] == v1["fingerprint"]


def test_unknown_revision_is_named(data_repo, tmp_path):
    repo, _ = data_repo
    with pytest.raises(SourceError, match=r"cannot read .*@v9:images"):
        prepare("images", tmp_path / "o", data_cfg(source="images", repo=str(repo), rev="v9", workers=1))


def test_credentials_in_a_repository_url_never_reach_the_report():
    url = "https://ci-bot:ghp_s3cr3t@git.example.com/team/data.git"
    assert redact(url) == "https://git.example.com/team/data.git"
    assert "s3cr3t" not in describe(data_cfg(source="images", repo=url, rev="v3"))
    assert redact("/local/path") == "/local/path" and redact("s3://bucket/key") == "s3://bucket/key"


def test_an_s3_dataset_is_a_manifest_of_references_and_steps_fetch_only_what_they_use(s3_env, image_folder,
                                                                                      tmp_path, monkeypatch):

    for path in image_folder.rglob("*.png"):
        s3_env["client"].upload_file(str(path), "data", f"refs/{path.relative_to(image_folder).as_posix()}")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache-data-step"))
    prepare("s3://data/refs", tmp_path / "ds", _cfg("s3://data/refs"))
    assert not (tmp_path / "ds" / "images").exists()  # no copy of the images in the artifact
    assert (tmp_path / "ds" / "source.json").read_text().count("s3://data/refs/") == 1
    # Another machine (an empty cache): a step asking for two images downloads two, verified by sha256.
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache-other-pod"))
    two = dataset.images(tmp_path / "ds", "train", pick=lambda rows: rows[:2])
    assert len(list((tmp_path / "cache-other-pod" / "sha256").iterdir())) == 2
    rows = {r["sha256"]: r for r in csv.DictReader(open(tmp_path / "ds" / "manifest.csv"))}
    for path, label, _ in two:  # the cached copy is the S3 object's bytes, by its sha256
        assert rows[path.name]["label"] == label
        assert path.read_bytes() == (image_folder / rows[path.name]["path"]).read_bytes()
    prepare(image_folder, tmp_path / "local", _cfg(image_folder))  # the same images, read in place
    assert sorted(p.read_bytes() for p, *_ in dataset.images(tmp_path / "ds", "test")) == \
        sorted(p.read_bytes() for p, *_ in dataset.images(tmp_path / "local", "test"))
    # An object replaced after the data step read it is refused, not trained on.
    victim = next(r for r in csv.DictReader(open(tmp_path / "ds" / "manifest.csv")) if r["split"] == "val")
    s3_env["client"].put_object(Bucket="data", Key=f"refs/{victim['path']}", Body=b"not the same image")
    with pytest.raises(DatasetError, match=f"s3://data/refs/{victim['path']} changed after the data step read it"):
        dataset.images(tmp_path / "ds", "val")


def test_a_git_repositorys_login_comes_from_netrc_not_from_data_repo(tmp_path, monkeypatch):
    """On a cluster the token is a Secret mounted as a netrc file ($NETRC, pipelines/finetune_pipeline.py):
    DVC's git client gets it in the URL it clones; data.repo, a pipeline parameter, never holds it."""
    from components.storage.sources import git_url

    netrc = tmp_path / "netrc"
    netrc.write_text("machine git.example.com login oauth2 password t0k:en/x\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert git_url("https://git.example.com/team/images.git") == \
        "https://oauth2:t0k%3Aen%2Fx@git.example.com/team/images.git"
    assert git_url("https://other.example.com/images.git") == "https://other.example.com/images.git"
    assert git_url("https://me:mine@git.example.com/x.git") == "https://me:mine@git.example.com/x.git"
    assert git_url("/srv/git/images") == "/srv/git/images"
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))  # an optional Secret that is not there
    assert git_url("https://git.example.com/team/images.git") == "https://git.example.com/team/images.git"

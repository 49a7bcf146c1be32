import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import DataConfig
from components.data import DataError, prepare
from components.artifacts import dataset
from components.storage.images import decode
from helpers import data_cfg, make_imagefolder


def _cfg(source, **kw) -> DataConfig:
    return data_cfg(source, **{"val_fraction": 0.2, "test_fraction": 0.2, **kw})


def _manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_split_is_deterministic_and_every_class_is_in_every_split(image_folder, tmp_path):
    a = prepare(image_folder, tmp_path / "a", _cfg(image_folder))
    b = prepare(image_folder, tmp_path / "b", _cfg(image_folder))
    assert a["fingerprint"] == b["fingerprint"]
    assert _manifest(tmp_path / "a") == _manifest(tmp_path / "b")
    assert a["num_images"] == 90
    for split in ("train", "val", "test"):
        assert all(n > 0 for n in a["counts"][split].values()), split
    # the artifact references the images in the folder read; it copies none of them
    assert not (tmp_path / "a" / "images").exists()
    assert json.loads((tmp_path / "a" / "source.json").read_text()) == {"kind": "folder", "location": str(image_folder)}
    (path, label, _), = dataset.images(tmp_path / "a", "test", pick=lambda rows: rows[:1])
    row = next(r for r in _manifest(tmp_path / "a").values() if r["split"] == "test")
    assert path == image_folder / row["path"] and label == row["label"] == row["path"].split("/")[0]


def test_fingerprint_changes_when_one_image_changes(image_folder, tmp_path):
    before = prepare(image_folder, tmp_path / "a", _cfg(image_folder))["fingerprint"]
    Image.new("RGB", (16, 16), "red").save(image_folder / "circle" / "img-000.png")
    assert prepare(image_folder, tmp_path / "b", _cfg(image_folder))["fingerprint"] != before


def test_adding_images_moves_at_most_two_existing_images_per_image_added(image_folder, tmp_path):
    """Exact per-class proportions cost a little stability: each added image can push one existing
    image across each of the two split boundaries of its class, never more."""
    prepare(image_folder, tmp_path / "a", _cfg(image_folder))
    more = make_imagefolder(tmp_path / "more", {"circle": 3, "square": 0, "triangle": 10}, seed=7)
    for path in more.rglob("*.png"):
        shutil.copyfile(path, image_folder / path.parent.name / f"new-{path.name}")
    prepare(image_folder, tmp_path / "b", _cfg(image_folder))
    before, after = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert len(after) == len(before) + 13
    moved = {label: sum(after[p]["split"] != row["split"] for p, row in before.items() if row["label"] == label)
             for label in ("circle", "square", "triangle")}
    assert moved["square"] == 0  # nothing added to it: nothing moves
    assert moved["circle"] <= 2 * 3 and moved["triangle"] <= 2 * 10


@pytest.mark.parametrize("per_class", [3, 7, 30, 101])
def test_every_class_is_split_in_the_configured_proportions(tmp_path, per_class):
    src = make_imagefolder(tmp_path / "raw", {"a": per_class, "b": per_class, "c": per_class}, size=24)
    report = prepare(src, tmp_path / "out", _cfg(src, val_fraction=0.15, test_fraction=0.15))
    expected = max(1, int(per_class * 0.15 + 0.5))  # rounded half up, at least one
    for label in ("a", "b", "c"):
        assert report["counts"]["test"][label] == expected and report["counts"]["val"][label] == expected
        assert report["counts"]["train"][label] == per_class - 2 * expected


def test_small_splits_are_warned_about_in_the_report(tmp_path):
    src = make_imagefolder(tmp_path / "raw", {"a": 30, "b": 30}, size=24)
    report = prepare(src, tmp_path / "out", _cfg(src, val_fraction=0.15, test_fraction=0.15))
    assert any(w.startswith("test split: fewer than 10 images for class(es) a 5, b 5") for w in report["warnings"])
    assert any(w.startswith("test split: 10 images: one image is 10.0% of accuracy") for w in report["warnings"])
    from pipelines.views import data_report_markdown  # and the Kubeflow UI shows them
    assert "**Warnings**" in data_report_markdown(report) and "fewer than 10 images" in data_report_markdown(report)
    big = make_imagefolder(tmp_path / "big", {"a": 200, "b": 200}, size=24)
    assert prepare(big, tmp_path / "big-out", _cfg(big, val_fraction=0.15, test_fraction=0.15))["warnings"] == []


def test_identical_images_land_in_the_same_split_and_are_reported(image_folder, tmp_path):
    for i in range(5):
        shutil.copyfile(image_folder / "circle" / f"img-{i:03d}.png", image_folder / "circle" / f"copy-{i}.png")
    report = prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    rows = _manifest(tmp_path / "out")
    for i in range(5):
        assert rows[f"circle/img-{i:03d}.png"]["split"] == rows[f"circle/copy-{i}.png"]["split"]
    assert len(report["duplicates"]) == 5


def test_unreadable_images_are_rejected_naming_each_file_and_nothing_is_written(image_folder, tmp_path):
    good = (image_folder / "square" / "img-000.png").read_bytes()
    (image_folder / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_folder / "circle" / "notes.jpg").write_text("this is not a picture")
    (image_folder / "triangle" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(image_folder, out, _cfg(image_folder))
    message = str(err.value)
    assert "3 unusable image file(s)" in message
    assert "truncated.png: truncated or corrupt image data" in message
    assert "notes.jpg: not a recognised image format" in message
    assert "empty.png: empty file (0 bytes)" in message
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temporary left behind


def test_missing_class_folder_is_named(image_folder, tmp_path):
    with pytest.raises(DataError, match=r"data.classes: class folder\(s\) missing in .*: hexagon"):
        prepare(image_folder, tmp_path / "out", _cfg(image_folder, classes=["circle", "hexagon"]))


def test_classes_setting_selects_a_subset(image_folder, tmp_path):
    report = prepare(image_folder, tmp_path / "out", _cfg(image_folder, classes=["square", "circle"]))
    assert report["classes"] == ["square", "circle"]
    assert report["num_images"] == 60


def test_single_class_dataset_is_rejected(tmp_path):
    src = make_imagefolder(tmp_path / "raw", {"only": 10})
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) \['only'\]; classification needs at least 2"):
        prepare(src, tmp_path / "out", _cfg(src))


def test_empty_class_folder_is_rejected_together_with_every_unreadable_file(image_folder, tmp_path):
    (image_folder / "hexagon").mkdir()
    (image_folder / "hexagon" / ".DS_Store").write_bytes(b"\0\0")
    (image_folder / "circle" / "cut.png").write_bytes((image_folder / "circle" / "img-000.png").read_bytes()[:40])
    with pytest.raises(DataError) as err:
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    assert "hexagon: class folder has no image files" in str(err.value)
    assert "1 unusable image file(s)" in str(err.value) and "cut.png" in str(err.value)  # in the same message


def test_class_too_small_for_the_split_is_named(tmp_path):
    src = make_imagefolder(tmp_path / "raw", {"big": 40, "tiny": 2})
    with pytest.raises(DataError, match=r"tiny \(train \d+, val \d+, test \d+\)"):
        prepare(src, tmp_path / "out", _cfg(src))


def test_non_image_files_are_ignored_and_listed(image_folder, tmp_path):
    (image_folder / "circle" / "Thumbs.db").write_bytes(b"x")
    (image_folder / "square" / "README.txt").write_text("labels by Ann")
    report = prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    assert sorted(report["ignored_files"]) == ["circle/Thumbs.db", "square/README.txt"]
    assert report["num_images"] == 90


def test_names_with_spaces_and_non_ascii_work(tmp_path):
    src = make_imagefolder(tmp_path / "raw", {"chat noir": 12, "éléphant": 12})
    (src / "chat noir" / "img-000.png").rename(src / "chat noir" / "photo de Zoé 1.png")
    report = prepare(src, tmp_path / "out", data_cfg(source=str(src), val_fraction=0.25, test_fraction=0.25,
                                                        seed=3, workers=1))
    assert report["classes"] == ["chat noir", "éléphant"]
    assert "chat noir/photo de Zoé 1.png" in _manifest(tmp_path / "out")
    assert all(path.exists() for split in ("train", "val", "test") for path, *_ in dataset.images(tmp_path / "out", split))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (5, 4), 128),
    lambda: Image.new("P", (5, 4), 3),
    lambda: Image.new("RGBA", (5, 4), (255, 0, 0, 128)),
    lambda: Image.fromarray(np.full((4, 5), 40000, dtype=np.uint16)),
    lambda: Image.new("CMYK", (5, 4), (0, 255, 0, 0)),
], ids=["grey", "palette", "rgba", "16-bit", "cmyk"])
def test_every_pixel_mode_decodes_to_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = decode(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (5, 4)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    out = decode(_encode(Image.fromarray(np.full((4, 5), 40000, dtype=np.uint16)), "PNG"))
    assert out.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


def test_rgba_is_composited_over_white():
    out = decode(_encode(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (6, 3), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (3, 6)


def test_animated_gif_is_rejected():
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="animated image with 3 frames"):
        decode(buf.getvalue())


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image: a decompression bomb in 60 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(ValueError, match="decompression bomb"):
        decode(_png_declaring(30000, 30000))


def test_webp_and_cmyk_jpeg_load_as_rgb():
    img = Image.new("RGB", (6, 4), (10, 200, 30))
    assert decode(_encode(img, "WEBP", lossless=True)).getpixel((0, 0)) == (10, 200, 30)
    assert decode(_encode(Image.new("CMYK", (6, 4), (0, 0, 0, 0)), "JPEG")).getpixel((0, 0))[0] > 240  # white


def test_symlink_pointing_outside_the_dataset_is_rejected(image_folder, tmp_path):
    secret = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(secret)
    (image_folder / "circle" / "link.png").symlink_to(secret)
    (image_folder / "square" / "inside.png").symlink_to(image_folder / "square" / "img-000.png")  # allowed
    with pytest.raises(DataError, match=r"link.png: symlink pointing outside the dataset folder") as err:
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    assert "inside.png" not in str(err.value)


def test_a_class_folder_that_links_outside_the_dataset_is_rejected(image_folder, tmp_path):
    elsewhere = make_imagefolder(tmp_path / "elsewhere", {"hexagon": 4})
    (image_folder / "hexagon").symlink_to(elsewhere / "hexagon", target_is_directory=True)
    with pytest.raises(DataError, match=r"hexagon/img-000.png: in a symlinked folder, pointing outside the dataset "
                                        r"folder") as err:
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    assert "4 unusable image file(s)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_one_image_in_two_class_folders_is_refused_or_with_skip_dropped_from_both(image_folder, tmp_path):
    shutil.copy(image_folder / "circle" / "img-003.png", image_folder / "square" / "copied-from-circle.png")
    with pytest.raises(DataError) as err:
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    message = str(err.value)
    assert "circle/img-003.png: the same bytes are also in class folder(s) square: one image, two labels" in message
    assert "square/copied-from-circle.png: the same bytes are also in class folder(s) circle" in message
    report = prepare(image_folder, tmp_path / "skip", _cfg(image_folder, on_invalid="skip", max_invalid_fraction=0.1))
    excluded = {e["path"] for e in report["excluded"]}
    assert excluded == {"circle/img-003.png", "square/copied-from-circle.png"}
    kept = {r.path for split in ("train", "val", "test") for r in dataset.rows(tmp_path / "skip", split)}
    assert not kept & excluded and len(kept) == 89


def _bad_corpus(folder):
    """One file of each kind of trouble, next to the good images."""
    good = (folder / "square" / "img-000.png").read_bytes()
    (folder / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "circle" / "notes.jpg").write_text("not a picture")
    (folder / "circle" / "zero.png").write_bytes(b"")
    (folder / "triangle" / "bomb.png").write_bytes(_png_declaring(30000, 30000))
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "green")]
    frames[0].save(folder / "triangle" / "anim.gif", save_all=True, append_images=frames[1:])
    photo = _encode(Image.effect_noise((64, 48), 40).convert("RGB"), "JPEG", quality=90)
    (folder / "square" / "cut.jpg").write_bytes(photo[: len(photo) * 2 // 3])  # validated at 1/8 scale
    return {"square/truncated.png", "circle/notes.jpg", "circle/zero.png", "triangle/bomb.png", "triangle/anim.gif",
            "square/cut.jpg"}


def test_bad_input_corpus_gives_one_clear_message_per_file(image_folder, tmp_path):
    bad = _bad_corpus(image_folder)
    with pytest.raises(DataError) as err:
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == len(bad)
    assert {line.strip().split(str(image_folder) + "/")[1].split(":")[0] for line in lines} == bad


def test_skip_mode_excludes_bad_files_and_lists_them(image_folder, tmp_path):
    bad = _bad_corpus(image_folder)
    cfg = _cfg(image_folder, on_invalid="skip", max_invalid_fraction=0.1)
    report = prepare(image_folder, tmp_path / "out", cfg)
    assert report["num_images"] == 90
    assert {e["path"] for e in report["excluded"]} == bad
    assert all(e["reason"] for e in report["excluded"])
    with pytest.raises(DataError, match=r"6 of 96 files are unreadable \(6.2%\), more than data.max_invalid_fraction"):
        prepare(image_folder, tmp_path / "out2", _cfg(image_folder, on_invalid="skip", max_invalid_fraction=0.05))


CPU_QUOTA_CHECK = """
import joblib, os
print(joblib.cpu_count(), len(os.sched_getaffinity(0)))
"""


def test_decode_workers_follow_a_containers_cpu_quota_not_the_machines_cores(tmp_path):
    """A pod with `limits.cpu: 1` on a bigger node: the data step's workers (and the fine-tune's threads)
    come from joblib.cpu_count(), which reads the CPU quota of the cgroup the container sees. Made real
    here: a cgroup v1 `cpu` group with a quota of one CPU, mounted where a container sees its own, the
    process inside it (root only, as in CI; skipped where the cgroup v1 cpu controller is not there)."""
    import os
    import subprocess
    import sys

    base = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (base / "cpu.cfs_quota_us").exists():
        pytest.skip("needs root and the cgroup v1 cpu controller")
    group = base / f"finetune-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU's worth of time
        script = (f"echo $$ > {group}/tasks && mount --bind {group} {base} && "
                  f"exec {sys.executable} -c '{CPU_QUOTA_CHECK}'")
        proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        limited, cores = map(int, proc.stdout.split())
        assert limited == 1 and cores == len(os.sched_getaffinity(0))
    finally:
        group.rmdir()

import csv
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from components.config import DataConfig
from components.data import DataError, prepare
from components.images import decode
from conftest import make_imagefolder


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), val_fraction=0.2, test_fraction=0.2, workers=1, **kw)


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
    # files are copied byte for byte, so the artifact stands alone
    row = next(iter(_manifest(tmp_path / "a").values()))
    assert (tmp_path / "a" / row["path"]).read_bytes() == (image_folder / row["path"][len("images/"):]).read_bytes()


def test_fingerprint_changes_when_one_image_changes(image_folder, tmp_path):
    before = prepare(image_folder, tmp_path / "a", _cfg(image_folder))["fingerprint"]
    Image.new("RGB", (16, 16), "red").save(image_folder / "circle" / "img-000.png")
    assert prepare(image_folder, tmp_path / "b", _cfg(image_folder))["fingerprint"] != before


def test_adding_images_never_moves_an_existing_image(image_folder, tmp_path):
    prepare(image_folder, tmp_path / "a", _cfg(image_folder))
    more = make_imagefolder(tmp_path / "more", {"circle": 20, "square": 20, "triangle": 20}, seed=7)
    for path in more.rglob("*.png"):
        shutil.copyfile(path, image_folder / path.parent.name / f"new-{path.name}")
    prepare(image_folder, tmp_path / "b", _cfg(image_folder))
    before, after = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert len(after) == len(before) + 60
    assert all(after[p]["split"] == row["split"] for p, row in before.items())


def test_identical_images_land_in_the_same_split_and_are_reported(image_folder, tmp_path):
    for i in range(5):
        shutil.copyfile(image_folder / "circle" / f"img-{i:03d}.png", image_folder / "circle" / f"copy-{i}.png")
    report = prepare(image_folder, tmp_path / "out", _cfg(image_folder))
    rows = _manifest(tmp_path / "out")
    for i in range(5):
        assert rows[f"images/circle/img-{i:03d}.png"]["split"] == rows[f"images/circle/copy-{i}.png"]["split"]
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
    assert "3 unreadable image file(s)" in message
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


def test_empty_class_folder_is_rejected(image_folder, tmp_path):
    (image_folder / "hexagon").mkdir()
    (image_folder / "hexagon" / ".DS_Store").write_bytes(b"\0\0")
    with pytest.raises(DataError, match=r"hexagon: class folder has no image files"):
        prepare(image_folder, tmp_path / "out", _cfg(image_folder))


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
    report = prepare(src, tmp_path / "out", DataConfig(source=str(src), val_fraction=0.25, test_fraction=0.25,
                                                        seed=3, workers=1))
    assert report["classes"] == ["chat noir", "éléphant"]
    assert (tmp_path / "out" / "images" / "chat noir" / "photo de Zoé 1.png").exists()


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

import pytest
import torch
from PIL import Image

from components.artifacts.policy import read as load_policy
from components.augment import augment
from components.training.transforms import eval_transform, train_transform
from components.config import AugmentConfig, ConfigError, parse_section
from components.data import prepare
from helpers import data_cfg, policy_cfg

POLICY = policy_cfg(image_size=24, resize_scale=(0.5, 1.0), hflip=0.5, rotation=15, brightness=0.3,
                       preview_images=4)


def test_policy_and_preview_are_written_and_round_trip(image_folder, tmp_path):
    prepare(image_folder, tmp_path / "data", data_cfg(source=str(image_folder), workers=1))
    augment(tmp_path / "data", tmp_path / "aug", POLICY)
    assert load_policy(tmp_path / "aug") == POLICY
    with Image.open(tmp_path / "aug" / "preview.png") as preview:
        assert preview.width > 400 and preview.height > 4 * 100  # 4 rows of 6 tiles


def test_train_transform_is_random_and_eval_transform_is_not():
    img = Image.effect_noise((40, 30), 64).convert("RGB")
    torch.manual_seed(0)
    a, b = train_transform(POLICY)(img), train_transform(POLICY)(img)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    assert torch.equal(eval_transform(POLICY)(img), eval_transform(POLICY)(img))


def test_normalisation_uses_the_policy_mean_and_std():
    img = Image.new("RGB", (24, 24), (255, 255, 255))
    policy = POLICY.model_copy(update={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert torch.allclose(eval_transform(policy)(img), torch.full((3, 24, 24), 2.0))


def test_reversed_range_is_rejected_naming_the_setting():
    with pytest.raises(ConfigError, match=r"augment: .*resize_scale must be \[low, high\]"):
        parse_section(AugmentConfig, {**policy_cfg().model_dump(), "resize_scale": [1.0, 0.5]}, "augment")

"""The augmentation policy (params.yaml's augment section, the augment step's policy.json) as
torchvision transforms v2: random draws for training, a fixed resize and centre crop for evaluation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from components.config import AugmentConfig


def _augmentations(policy: AugmentConfig) -> list:
    steps = [v2.RandomResizedCrop(policy.image_size, scale=policy.resize_scale, ratio=policy.resize_ratio,
                                  antialias=True)]
    if policy.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(policy.hflip))
    if policy.rotation > 0:
        steps.append(v2.RandomRotation(policy.rotation))
    if any((policy.brightness, policy.contrast, policy.saturation, policy.hue)):
        steps.append(v2.ColorJitter(policy.brightness, policy.contrast, policy.saturation, policy.hue))
    return steps


def _to_float(policy: AugmentConfig, normalize: bool) -> list:
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(list(policy.mean), list(policy.std)))
    return steps


def train_transform(policy: AugmentConfig, normalize: bool = True) -> v2.Compose:
    """PIL RGB image -> augmented float tensor (C, H, W)."""
    return v2.Compose([v2.ToImage(), *_augmentations(policy), *_to_float(policy, normalize)])


def device_transform(policy: AugmentConfig) -> v2.Compose:
    """uint8 image tensor (C, H, W) on any device, a GPU's included -> what train_transform makes of it."""
    return v2.Compose([*_augmentations(policy), *_to_float(policy, True)])


def eval_transform(policy: AugmentConfig, normalize: bool = True) -> v2.Compose:
    """PIL RGB image -> resized, centre-cropped float tensor (C, H, W); no randomness."""
    return v2.Compose([v2.ToImage(), v2.Resize(policy.image_size, antialias=True), v2.CenterCrop(policy.image_size),
                       *_to_float(policy, normalize)])

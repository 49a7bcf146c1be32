"""The dataset artifact's splits as PyTorch datasets, and the loaders the fine-tune draws from."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from components.artifacts import dataset
from components.config import AugmentConfig, FinetuneConfig
from components.training.transforms import eval_transform, train_transform


class ImageSplit(torch.utils.data.Dataset):
    """One split of the dataset artifact as (transformed image, class index) pairs; every image's bytes
    are checked against the manifest as it is read."""

    def __init__(self, dataset_dir, split: str, transform, class_names: list[str] | None = None):
        self.class_names = class_names or dataset.classes(dataset_dir)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.items = [(image, index[image.label]) for image in dataset.images(dataset_dir, split)]
        if not self.items:
            raise ValueError(f"{dataset_dir}: the '{split}' split is empty")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, label = self.items[i]
        return self.transform(dataset.load(image)), label


def make_loaders(dataset_dir, policy: AugmentConfig, cfg: FinetuneConfig, class_names: list[str],
                 augment_on_device: bool = False):
    """The training and validation loaders. With `augment_on_device` the training loader's workers only
    decode (uint8 tensors, as they come) and the loop augments each batch where the model is (a GPU)."""
    train = ImageSplit(dataset_dir, "train", v2.ToImage() if augment_on_device else train_transform(policy),
                       class_names)
    val = ImageSplit(dataset_dir, "val", eval_transform(policy), class_names)
    generator = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())
    # drop_last: a last batch of one image would break BatchNorm in training mode
    return (torch.utils.data.DataLoader(train, shuffle=True, generator=generator, drop_last=len(train) > cfg.batch_size,
                                        collate_fn=as_list if augment_on_device else None, **common),
            torch.utils.data.DataLoader(val, shuffle=False, **common))


def as_list(samples):
    """Images of different sizes as a list, their labels as a tensor (the batch is augmented later)."""
    return [x for x, _ in samples], torch.tensor([y for _, y in samples])


def epoch_batches(train_loader) -> list[list[int]]:
    """The batches (lists of indices) the loader would give this epoch, drawn as it draws them, from its
    generator: so the cached and the uncached paths train on the same images in the same order."""
    torch.empty((), dtype=torch.int64).random_(generator=train_loader.generator)  # the loader's base seed
    return list(train_loader.batch_sampler)


def in_order(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]

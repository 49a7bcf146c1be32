"""The dataset artifact's splits as PyTorch datasets, and the loaders the fine-tune draws from.

What each epoch trains on is a function of finetune.seed and the epoch alone: the order of the training
images (a permutation drawn for that epoch) and every image's augmentation (drawn from a seed of its own,
`sample_seed`). Not of the random state a run happens to be in: a resumed run, loader worker processes
(persistent or not), several data-parallel processes and the frozen-prefix cache all see the very images
an uninterrupted single process sees.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.transforms import v2

from components.artifacts import dataset
from components.config import AugmentConfig, FinetuneConfig
from components.training.transforms import eval_transform, train_transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of training image `index`'s augmentation in `epoch` (1-based); index -1: the epoch's order."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: what torch.Generator.manual_seed takes


def seeded(transform, image, seed: int | None):
    """`transform(image)` with its random draws from `seed` (none: as they come), the process's own random
    state left as it was."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator: v2 transforms draw their parameters there
        return transform(image)


class ImageSplit(torch.utils.data.Dataset):
    """One split of the dataset artifact as (transformed image, class index) pairs; every image's bytes
    are checked against the manifest as it is read. Indexed by position, or by (position, augmentation
    seed) for training (EpochBatches).

    With `decode_threads` > 1 a batch's images are read and decoded by that many threads (Pillow lets go
    of the GIL while it decodes; 1.6 against 3.0 ms a 500x375 JPEG on 2 cores) and then transformed one
    by one in this thread, whose random state the seeded augmentations use: the very samples, in order.
    For a loader without worker processes, whose batches are otherwise decoded on one core."""

    def __init__(self, dataset_dir, split: str, transform, class_names: list[str] | None = None,
                 defer_augmentation: bool = False, decode_threads: int = 1):
        self.class_names = class_names or dataset.classes(dataset_dir)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.items = [(image, index[image.label]) for image in dataset.images(dataset_dir, split)]
        if not self.items:
            raise ValueError(f"{dataset_dir}: the '{split}' split is empty")
        self.transform, self.defer = transform, defer_augmentation
        self.decode_threads, self._pool = decode_threads, None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, _ = key if isinstance(key, tuple) else (key, None)
        return self._sample(key, dataset.load(self.items[i][0]))

    def __getitems__(self, keys: list) -> list:
        """A batch's samples (what a DataLoader asks for when the dataset has this method)."""
        if self.decode_threads <= 1 or len(keys) == 1:
            return [self[key] for key in keys]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        images = self._pool.map(lambda key: dataset.load(self.items[key[0] if isinstance(key, tuple) else key][0]),
                                keys)
        return [self._sample(key, image) for key, image in zip(keys, images)]

    def _sample(self, key, image):
        i, seed = key if isinstance(key, tuple) else (key, None)
        label = self.items[i][1]
        if self.defer:  # decoded only: the batch is augmented where the model is, from this seed
            return (self.transform(image), seed), label
        return seeded(self.transform, image, seed), label

    def __getstate__(self):  # a loader worker process gets the split without this process's threads
        return {**self.__dict__, "_pool": None}


class EpochBatches(torch.utils.data.Sampler):
    """The training batches of an epoch (`set_epoch` first): its permutation of the images cut into batches
    of finetune.batch_size, this process's share of each (rank::world), each image with its augmentation
    seed. One sampler for the run: loader workers may persist, since nothing they hold decides a draw."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool):
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch, self.rank, self.world = 1, 0, 1

    def share(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """Every process's whole batches of `epoch`, as image indices."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1)))
        batches = [order[start:start + self.batch_size].tolist() for start in range(0, self.n, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def shares(self, epoch: int) -> list[list[int]]:
        """This process's share of each batch of `epoch`."""
        return [batch[self.rank::self.world] for batch in self.batches(epoch)]

    def __iter__(self):
        for share in self.shares(self.epoch):
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in share]

    def __len__(self) -> int:
        return self.n // self.batch_size + (0 if self.drop_last or self.n % self.batch_size == 0 else 1)


def make_loaders(dataset_dir, policy: AugmentConfig, cfg: FinetuneConfig, class_names: list[str],
                 augment_on_device: bool = False):
    """The training and validation loaders. With `augment_on_device` the training loader's workers only
    decode (uint8 tensors, as they come, with their augmentation seeds) and the loop augments each batch
    where the model is (a GPU)."""
    # no worker processes: the batch's images decoded by as many threads as torch computes with
    threads = torch.get_num_threads() if cfg.num_workers == 0 else 1
    train = ImageSplit(dataset_dir, "train", v2.ToImage() if augment_on_device else train_transform(policy),
                       class_names, defer_augmentation=augment_on_device, decode_threads=threads)
    val = ImageSplit(dataset_dir, "val", eval_transform(policy), class_names, decode_threads=threads)
    # drop_last: a last batch of one image would break BatchNorm in training mode
    sampler = EpochBatches(len(train), cfg.batch_size, cfg.seed, drop_last=len(train) > cfg.batch_size)
    # A generator of their own: iterating a loader draws its workers' base seed from it, not from the
    # process's random state (which the model's own draws, dropout, use).
    common = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                  pin_memory=torch.cuda.is_available())
    return (torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=as_list if augment_on_device else None,
                                        generator=torch.Generator().manual_seed(cfg.seed), **common),
            torch.utils.data.DataLoader(val, batch_size=cfg.batch_size, shuffle=False,
                                        generator=torch.Generator().manual_seed(cfg.seed), **common))


def as_list(samples):
    """Images of different sizes as a list (each with its augmentation seed), their labels as a tensor."""
    return [x for x, _ in samples], torch.tensor([y for _, y in samples])


def in_order(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]

"""Training: what the finetune step runs.

    loop.py          fit: train_one_epoch, evaluate, early stopping; one way of feeding batches, chosen once
    recipe.py        what is frozen, the optimizer's groups, the learning-rate schedule, gradual unfreezing
    loaders.py       the dataset artifact's splits as PyTorch datasets and loaders
    transforms.py    the augmentation policy as torchvision transforms v2 (training, evaluation, on a device)
    resume.py        a checkpoint every epoch in finetune.checkpoint_dir, and resuming from it
    prefix_cache.py  the frozen first layers run once, not every epoch
    distributed.py   device, precision and data-parallel processes (Lightning Fabric, PyTorch's launcher)
    curves.py        the training curves as a picture
"""

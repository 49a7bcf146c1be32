"""DEMO ONLY: scikit-learn's handwritten digits as PNG files in ImageFolder layout.

    python -m demo.digits data/raw/digits-0-4 data/raw/digits-5-9     # source task, target task

Writes the UCI handwritten digits (1,797 8x8 greyscale scans), split by class into a source task
(demo.source_classes: what the demo zoo's network learns) and the target task the pipeline
fine-tunes on (demo.target_classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.storage.atomic import atomic_dir
from demo import command_line


def export_digits(classes: list[int], out: str | Path) -> int:
    """Write every digit of `classes` to `out`/<digit>/digit-<index>.png; returns the count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = set(classes)
    count = 0
    with atomic_dir(out) as tmp:
        for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
            if int(target) not in wanted:
                continue
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            img = np.round(pixels * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
            Image.fromarray(img, mode="L").save(folder / f"digit-{index:04d}.png")
            count += 1
    return count


def main(argv=None) -> int:
    (source, target), params = command_line(argv, __doc__.splitlines()[0], {
        "SOURCE": "folder to write demo.source_classes' digits to",
        "TARGET": "folder to write demo.target_classes' digits to"})
    n_source = export_digits(params.demo.source_classes, source)
    n_target = export_digits(params.demo.target_classes, target)
    print(f"demo: exported {n_source} source and {n_target} target digit images")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)

"""What the per-layer statistics (components/training/layer_stats.py) cost the default run: its fine-tune
on the default pipeline's inputs (`make run` first), with the statistics and with them switched off,
alternated, median of --repeats each.

    .venv/bin/python benchmarks/layer_stats_overhead.py --repeats 3

Prints the two medians, their spread and the ratio. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.config import load_params, override  # noqa: E402
from components.finetune import finetune  # noqa: E402
from components.training import loop  # noqa: E402


class _Off:
    """LayerStats with nothing measured."""

    def __init__(self, model):
        pass

    def before_step(self):
        pass

    def after_step(self):
        pass

    def epoch_metrics(self):
        return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = override(load_params(ROOT / "params.yaml").finetune, checkpoint_dir="")
    measured = loop.LayerStats
    times = {"with statistics": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, stats in (("with statistics", measured), ("without", _Off)):
                loop.LayerStats = stats
                began = time.perf_counter()
                finetune(ROOT / "data/prepared", ROOT / "artifacts/augment", ROOT / "artifacts/pretrained",
                         Path(tmp) / f"model-{i}", cfg)
                times[name].append(time.perf_counter() - began)
    loop.LayerStats = measured
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})")
    ratio = statistics.median(times["with statistics"]) / statistics.median(times["without"])
    print(f"overhead: {100 * (ratio - 1):+.1f}% of the default run's fine-tune")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m components.tracking target --out artifacts/tracking.json: where runs go now.

DVC's `tracking` stage runs this every time (it resolves something outside the workspace); validate
and register depend on its output, so pointing MLFLOW_TRACKING_URI somewhere new records the last
run there without training again."""

from __future__ import annotations

import argparse

from components.config import load_params
from components.storage.atomic import write_json
from components.tracking.store import target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.tracking",
                                     description="target: where runs go now")
    parser.add_argument("command", choices=["target"])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: tracking)")
    parser.add_argument("--out", required=True, help="JSON file to write (a DVC dependency of validate)")
    args = parser.parse_args(argv)
    result = target(load_params(args.params).tracking)
    write_json(args.out, result)
    print(f"tracking: runs go to {result['tracking_uri']}, experiment {result['experiment']!r}")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)

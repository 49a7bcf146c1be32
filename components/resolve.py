"""resolve: pin the run's moving inputs to immutable ones before any step reads them.

    python -m components.resolve --params params.yaml --out resolved.json

A Kubeflow run starts with this, never cached, so that the steps after it are cached on what
their inputs hold, not on what they are called: the dataset source becomes its version (the commit
of `data.rev`, or a hash of the S3 prefix's listing or of the folder's files) and
`pretrained.uri` an immutable URI and a content id (a registry alias becomes its version). The
data and fetch_pretrained steps take these as inputs and read exactly that content, or fail.
Cheap: listings, heads and registry look-ups, no image or weight file is read (a local
checkpoint is hashed).
"""

from __future__ import annotations

import argparse

from components.config import DataConfig, PretrainedConfig, load_params
from components.models import zoo
from components.redaction import redact
from components.storage import sources
from components.storage.atomic import write_json


def resolve(data: DataConfig, pretrained: PretrainedConfig) -> dict[str, str]:
    """{"data_version", "pretrained_uri", "pretrained_version"}: equal values, equal content."""
    uri, content = zoo.pin(pretrained.uri, pretrained.arch, pretrained.sha256)
    return {"data_version": sources.pin(data), "pretrained_uri": uri, "pretrained_version": content}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections: data, pretrained)")
    parser.add_argument("--out", required=True, help="JSON file for the resolved values")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    resolved = resolve(params.data, params.pretrained)
    write_json(args.out, resolved)
    for key, value in resolved.items():
        print(f"resolve: {key} {redact(value)}")
    return 0


if __name__ == "__main__":
    from components import cli

    cli.run_process(main)

"""register: put a model that passed validation into the MLflow model registry and move its alias.

    python -m components.register --params params.yaml --validation artifacts/validate \
        --out artifacts/registration.json

Registers nothing when the gate failed: it records why on the run and in registration.json.
A retry of the same run reuses the version it registered before instead of adding another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.atomic import read_json, write_json
from components.config import RegisterConfig, load_params
from components.tracking import tracking_uri

# Run tags copied onto the model version, so the registry alone says where a model came from.
LINEAGE_TAGS = ("git_commit", "data_fingerprint", "data_source", "pretrained_uri", "pretrained_sha256",
                "pipeline_runner", "pipeline_run_id")


def register(validation_dir, out, cfg: RegisterConfig) -> dict:
    """Register the validated model of `validation_dir`'s run (only if its gate passed)."""
    import mlflow

    validation_dir = Path(validation_dir)
    gate = read_json(validation_dir / "gate.json")
    run = read_json(validation_dir / "run.json")
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()

    if not gate["passed"]:
        reason = "validation gate failed: " + "; ".join(gate["reasons"])
        client.set_tag(run["run_id"], "registration", "skipped: " + reason)
        result = {"registered": False, "reason": reason, "run_id": run["run_id"]}
        write_json(out, result)
        return result

    existing = client.search_model_versions(f"name = '{cfg.model_name}' and run_id = '{run['run_id']}'")
    if existing:  # a retry of this run: keep the version it already made
        version = existing[0]
    else:
        run_tags = client.get_run(run["run_id"]).data.tags
        tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
        tags["gate_passed"] = "true"
        version = mlflow.register_model(run["model_uri"], cfg.model_name, tags=tags)
        # register_model from a logged-model URI links the version to the run that logged it
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    client.set_tag(run["run_id"], "registration", f"{cfg.model_name} v{version.version} @{cfg.alias}")
    result = {"registered": True, "name": cfg.model_name, "version": int(version.version), "alias": cfg.alias,
              "run_id": run["run_id"], "reused_existing_version": bool(existing)}
    write_json(out, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: register)")
    parser.add_argument("--validation", required=True, help="folder from components.validate (gate.json, run.json)")
    parser.add_argument("--out", required=True, help="registration.json to write")
    args = parser.parse_args(argv)
    result = register(args.validation, args.out, load_params(args.params).registry)
    if result["registered"]:
        print(f"register: {result['name']} version {result['version']} is now @{result['alias']}")
    else:
        print(f"register: nothing registered ({result['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

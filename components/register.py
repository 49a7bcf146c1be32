"""register: put a model that passed validation into the MLflow model registry and move the aliases.

    python -m components.register --params params.yaml --reports artifacts/validate \
        --out artifacts/registration.json

Nothing is registered when the gate failed, or when the weights are the champion's own (a scheduled
run whose inputs did not change); the run and registration.json say why. A passing
version gets `register.challenger_alias` (which only moves forward, to a newer version); with
`register.promotion: auto` it also gets `register.alias`, but only if that alias still points
where validate read it (compare-and-set under the registry lock), so two pipelines finishing
together never promote a model that was compared with a champion that is no longer there, and
only if validate could compare the two (a champion with other classes is replaced by hand).

Order of effects: registration.json is written first as an intent (so an unwritable output fails
before the registry changes), then the version, then the aliases, then the final record. A retry
after a failure anywhere in between reuses the run's version and completes the rest.
"""

from __future__ import annotations

import argparse
import sys

from components import tracking
from components.atomic import read_json, write_json
from components.config import RegisterConfig, load_params
from components.registry import current_version, promotion_lock

# Run tags copied onto the model version, so the registry alone says where a model came from.
LINEAGE_TAGS = ("git_commit", "data_fingerprint", "data_source", "pretrained_uri", "pretrained_sha256",
                "pipeline_runner", "pipeline_run_id", "params_hash", "weights_sha256", "dvc_experiment")


def _champion_seen(gate: dict) -> str | None:
    """The champion version validate compared against (None: there was none)."""
    champion = gate.get("champion") or {}
    return champion.get("champion_version")


def _skip(client, run: dict, out, reason: str) -> dict:
    """Register nothing: say why on the run and in registration.json."""
    client.set_tag(run["run_id"], "registration", "skipped: " + reason)
    result = {"registered": False, "reason": reason, "run_id": run["run_id"]}
    write_json(out, result)
    return result


def register(validation_dir, out, cfg: RegisterConfig) -> dict:
    """Register the validated model of `validation_dir`'s run (only if its gate passed)."""
    import mlflow

    gate = read_json(f"{validation_dir}/gate.json")
    run = read_json(f"{validation_dir}/run.json")
    client = tracking.client()

    if not gate["passed"]:
        return _skip(client, run, out, "validation gate failed: " + "; ".join(gate["reasons"]))
    write_json(out, {"registered": False, "state": "intent: registering", "name": cfg.model_name,
                     "run_id": run["run_id"]})  # fails here, before any effect, if `out` cannot be written

    with promotion_lock(client, cfg.model_name):
        existing = client.search_model_versions(f"name = '{cfg.model_name}' and run_id = '{run['run_id']}'")
        if existing:  # a retry of this run: keep the version it already made
            version = str(existing[0].version)
        else:
            run_tags = client.get_run(run["run_id"]).data.tags
            champion, weights = current_version(client, cfg.model_name, cfg.alias), run_tags.get("weights_sha256")
            if weights and champion and client.get_model_version(cfg.model_name, champion).tags.get(
                    "weights_sha256") == weights:
                return _skip(client, run, out, f"weights identical to @{cfg.alias} v{champion} (sha256 "
                                               f"{weights[:12]}): nothing new to register")
            tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
            tags["gate"] = "passed"
            version = str(mlflow.register_model(run["model_uri"], cfg.model_name, tags=tags).version)
        challenger = current_version(client, cfg.model_name, cfg.challenger_alias)
        if challenger is None or int(challenger) < int(version):  # never back to an older version
            client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, version)

        seen, now = _champion_seen(gate), current_version(client, cfg.model_name, cfg.alias)
        uncompared = (gate.get("champion") or {}).get("skipped") if seen else None
        if now == version:
            promoted, promotion = True, f"already @{cfg.alias}"
        elif cfg.promotion == "manual":
            promoted, promotion = False, f"register.promotion is manual: @{cfg.challenger_alias} only"
        elif uncompared:
            promoted, promotion = False, (f"not promoted: {uncompared}; to replace it anyway: mlflow's "
                                          f"set_registered_model_alias('{cfg.model_name}', '{cfg.alias}', {version})")
        elif now == seen:
            client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
            promoted, promotion = True, f"@{cfg.alias} moved from {f'v{seen}' if seen else 'nobody'}"
        else:
            promoted, promotion = False, (f"not promoted: @{cfg.alias} moved from "
                                          f"{f'v{seen}' if seen else 'nobody'} to v{now} after validation")
        client.set_model_version_tag(cfg.model_name, version, "promotion", promotion)

    client.set_tag(run["run_id"], "registration", f"{cfg.model_name} v{version}: {promotion}")
    aliases = [a for a in (cfg.challenger_alias, cfg.alias) if current_version(client, cfg.model_name, a) == version]
    result = {"registered": True, "name": cfg.model_name, "version": int(version), "promoted": promoted,
              "promotion": promotion, "aliases": aliases, "run_id": run["run_id"],
              "reused_existing_version": bool(existing)}
    write_json(out, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: register)")
    parser.add_argument("--reports", required=True, help="folder from components.validate (gate.json, run.json)")
    parser.add_argument("--out", required=True, help="registration.json to write")
    args = parser.parse_args(argv)
    result = register(args.reports, args.out, load_params(args.params).registry)
    if result["registered"]:
        print(f"register: {result['name']} version {result['version']} ({result['promotion']})")
    else:
        print(f"register: nothing registered ({result['reason']})")
    return 0


if __name__ == "__main__":
    from components import cli

    sys.exit(cli.run(main))

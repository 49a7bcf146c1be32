"""register: put a model that passed validation into the MLflow model registry and move the aliases.

    python -m components.register --params params.yaml --reports artifacts/validate \
        --out artifacts/registration.json

Nothing is registered when the gate failed, or when a version with the same weights exists already
(a scheduled run whose inputs did not change trains the same weights bit for bit); the run and
registration.json say why. A passing version gets `register.challenger_alias` (which only moves
forward, to a newer version); with `register.promotion: auto` it also gets `register.alias`, but only
if that alias still points where validate read it (compare-and-set under the registry lock), so two
pipelines finishing together never promote a model that was compared with a champion that is no
longer there, and only if validate could compare the two (a champion with other classes is replaced
by hand). With `validate.compare_with_champion: false` nothing was compared, and the thresholds alone
promote. `decide_promotion` is that decision, a pure function of what validate saw and what the
registry holds now.

Order of effects: registration.json is written first as an intent (so an unwritable output fails
before the registry changes), then the version, then the aliases, then the final record. A retry
after a failure anywhere in between reuses the run's version and completes the rest.
"""

from __future__ import annotations

import argparse

from components.artifacts import registration, reports
from components.artifacts.reports import Verdict
from components.config import RegisterConfig, load_params
from components.tracking import store
from components.tracking.registry import current_version, promotion_lock

# Run tags copied onto the model version, so the registry alone says where a model came from.
LINEAGE_TAGS = ("git_commit", "data_fingerprint", "data_source", "pretrained_uri", "pretrained_sha256",
                "pipeline_runner", "pipeline_run_id", "params_hash", "weights_sha256", "dvc_experiment")


def duplicate_reason(same_weights: str | None, weights: str, champion: str | None, alias: str) -> str | None:
    """Why a new version would add nothing: version `same_weights` holds these very weights already."""
    if same_weights is None:
        return None
    held = f" (@{alias})" if same_weights == champion else ""
    return f"weights identical to v{same_weights}{held}, sha256 {weights[:12]}: nothing new to register"


def decide_promotion(verdict: Verdict, version: str, champion_now: str | None,
                     cfg: RegisterConfig) -> tuple[bool, str]:
    """(is `version` @alias after this, what happened in words), from what validate compared it with
    (`verdict`) and where the alias points now."""
    seen, alias = verdict.champion_seen, cfg.alias
    if champion_now == version:
        return True, f"already @{alias}"
    if cfg.promotion == "manual":
        return False, f"register.promotion is manual: @{cfg.challenger_alias} only"
    if verdict.comparison == "disabled":
        return True, (f"@{alias} moved from {_named(champion_now)} on the thresholds alone "
                      "(validate.compare_with_champion is false)")
    if verdict.comparison == "not_comparable":
        return False, (f"not promoted: {verdict.not_compared}; to replace it anyway: mlflow's "
                       f"set_registered_model_alias('{cfg.model_name}', '{alias}', {version})")
    if champion_now == seen:
        return True, f"@{alias} moved from {_named(seen)}"
    return False, f"not promoted: @{alias} moved from {_named(seen)} to {_named(champion_now)} after validation"


def _named(version: str | None) -> str:
    return f"v{version}" if version else "nobody"


def challenger_moves(challenger_now: str | None, version: str) -> bool:
    """The challenger alias only moves forward, never back to an older version."""
    return challenger_now is None or int(challenger_now) < int(version)


def _skip(client, out, run_id: str, reason: str) -> dict:
    """Register nothing: say why on the run and in registration.json."""
    client.set_tag(run_id, "registration", "skipped: " + reason)
    result = {"registered": False, "reason": reason, "run_id": run_id}
    registration.write(out, result)
    return result


def register(validation_dir, out, cfg: RegisterConfig) -> dict:
    """Register the validated model of `validation_dir`'s run (only if its gate passed)."""
    import mlflow

    verdict = reports.read_verdict(validation_dir)
    run_id = verdict.run.run_id
    client = store.client()

    if not verdict.passed:
        return _skip(client, out, run_id, "validation gate failed: " + "; ".join(verdict.reasons))
    registration.write_intent(out, cfg.model_name, run_id)

    with promotion_lock(client, cfg.model_name):
        existing = client.search_model_versions(f"name = '{cfg.model_name}' and run_id = '{run_id}'")
        if existing:  # a retry of this run: keep the version it already made
            version = str(existing[0].version)
        else:
            run_tags = client.get_run(run_id).data.tags
            weights = run_tags.get("weights_sha256")
            same = client.search_model_versions(f"name = '{cfg.model_name}' and tags.weights_sha256 = '{weights}'") \
                if weights else []
            reason = duplicate_reason(str(min(int(v.version) for v in same)) if same else None, weights or "",
                                      current_version(client, cfg.model_name, cfg.alias), cfg.alias)
            if reason:
                return _skip(client, out, run_id, reason)
            tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
            tags["gate"] = "passed"
            version = str(mlflow.register_model(verdict.run.model_uri, cfg.model_name, tags=tags).version)
        if challenger_moves(current_version(client, cfg.model_name, cfg.challenger_alias), version):
            client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, version)
        champion_now = current_version(client, cfg.model_name, cfg.alias)
        promoted, promotion = decide_promotion(verdict, version, champion_now, cfg)
        if promoted and champion_now != version:
            client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        client.set_model_version_tag(cfg.model_name, version, "promotion", promotion)

    client.set_tag(run_id, "registration", f"{cfg.model_name} v{version}: {promotion}")
    aliases = [a for a in (cfg.challenger_alias, cfg.alias) if current_version(client, cfg.model_name, a) == version]
    result = {"registered": True, "name": cfg.model_name, "version": int(version), "promoted": promoted,
              "promotion": promotion, "aliases": aliases, "run_id": run_id,
              "reused_existing_version": bool(existing)}
    registration.write(out, result)
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

    cli.run_process(main)

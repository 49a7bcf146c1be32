"""Resuming an interrupted fine-tune: finetune.checkpoint_dir holds, while a run is under way,

    last.pt          the state after the last finished epoch: model, optimizer groups, history, early
                     stopping, every random state (tensors and plain data: loadable with weights_only)
    last.json        its epoch and run key, readable without torch
    mlflow_run.json  the MLflow run it logs to, so a resumed run continues that run
    prefix-cache     the frozen prefix's features (components/training/prefix_cache.py)

A checkpoint is resumed only by a run with the same key (the data, policy, weights and settings);
when the fine-tune finishes, the folder is emptied, so the next run with the same inputs starts afresh.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from components.storage.atomic import read_json, save_torch, write_json

LAST, LAST_INFO, RUN_MARKER = "last.pt", "last.json", "mlflow_run.json"


def rng_state() -> dict:
    """This process's random states (what the model's own draws, dropout, take from), as tensors and plain
    values (loadable with weights_only). The images each epoch trains on depend on none of them
    (components/training/loaders.py)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def rng_states(fabric) -> list[dict]:
    """Every data-parallel process's random states, rank by rank (each may have drawn differently)."""
    if fabric.world_size == 1:
        return [rng_state()]
    import torch.distributed as dist

    gathered = [None] * fabric.world_size
    dist.all_gather_object(gathered, rng_state())
    return gathered


def set_rng_state(saved, rank: int = 0) -> None:
    """Restore this process's states from a checkpoint's (a list by rank; one dict in older checkpoints)."""
    state = saved[rank] if isinstance(saved, list) else saved
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save(folder: str, state: dict) -> None:
    """The state after an epoch ({"run_key", "epoch", ...}), replacing the previous one whole."""
    path = Path(folder) / LAST
    save_torch(state, path)
    write_json(path.with_suffix(".json"), {"epoch": state["epoch"], "run_key": state["run_key"]})


def load(folder: str, run_key: str, lead: bool = True) -> dict | None:
    """The saved state of a run with this key, or None: none saved, another run's (said), or unreadable
    (cut short by a full disk, say: moved aside by rank 0, named, since a checkpoint only saves time)."""
    path = Path(folder) / LAST
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors... for a damaged file
        if lead:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.replace(aside)
            _say(f"finetune: checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                 f"moved to {aside.name}, starting afresh")
        return None
    if saved.get("run_key") != run_key:
        if lead:
            _say(f"finetune: {path} belongs to other inputs or settings; starting afresh")
        return None
    return saved


def interrupted_run(folder: str, run_key: str) -> str | None:
    """The MLflow run of an interrupted fine-tune with the same inputs, to continue it."""
    if not folder:
        return None
    marker = Path(folder) / RUN_MARKER
    if marker.exists() and (Path(folder) / LAST).exists() and read_json(marker).get("run_key") == run_key:
        return read_json(marker)["run_id"]
    return None


def mark_run(folder: str, run_key: str, run_id: str) -> None:
    write_json(Path(folder) / RUN_MARKER, {"run_key": run_key, "run_id": run_id})


def finished(folder: str) -> None:
    """The run is done: a later run with the same inputs starts from scratch."""
    for leftover in (LAST, LAST_INFO, RUN_MARKER):
        (Path(folder) / leftover).unlink(missing_ok=True)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)

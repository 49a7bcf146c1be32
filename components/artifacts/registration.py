"""registration.json (components.register writes it): what register did and why.

    {"registered": false, "state": "intent: registering", ...}     written before the registry changes
    {"registered": true, "name", "version", "promoted", "promotion", "aliases", "run_id", ...}
    {"registered": false, "reason", "run_id"}                       nothing registered, and why
"""

from __future__ import annotations

from pathlib import Path

from components.storage.atomic import read_json, write_json


def write_intent(out: str | Path, name: str, run_id: str) -> None:
    """Fails here, before any effect on the registry, when `out` cannot be written."""
    write_json(out, {"registered": False, "state": "intent: registering", "name": name, "run_id": run_id})


def write(out: str | Path, result: dict) -> None:
    write_json(out, result)


def read(out: str | Path) -> dict:
    return read_json(out)

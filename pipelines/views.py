"""What the Kubeflow UI shows for a step: Markdown tables and PNGs embedded in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def png_html(title: str, png: Path) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return (f"<html><body><h3>{html.escape(title)}</h3>"
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}"/></body></html>')


def data_report_markdown(report: dict) -> str:
    splits = list(report["counts"])
    lines = [f"### Dataset `{report['source']}`", "",
             f"{report['num_images']} images, {len(report['classes'])} classes, "
             f"fingerprint `{report['fingerprint']}`", "",
             "| class | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for label in report["classes"]:
        lines.append(f"| {label} | " + " | ".join(str(report["counts"][s][label]) for s in splits) + " |")
    if report["duplicates"]:
        lines += ["", f"{len(report['duplicates'])} groups of identical files (kept in the same split)."]
    return "\n".join(lines) + "\n"


def gate_markdown(gate: dict, run: dict) -> str:
    verdict = "**PASSED**" if gate["passed"] else "**FAILED**: " + "; ".join(gate["reasons"])
    lines = [f"### Validation gate: {verdict}", "", f"MLflow run `{run['run_id']}` ({run['run_name']})", "",
             "| check | value | threshold | passed |", "|---|---|---|---|"]
    for c in gate["checks"]:
        lines.append(f"| {c['name']} | {c['value']:.4f} | {c['threshold']} | {'yes' if c['passed'] else 'no'} |")
    champion = gate.get("champion") or {}
    if "skipped" in champion:
        lines += ["", f"Champion comparison skipped: {champion['skipped']}."]
    elif champion:
        lines += ["", f"#### Against champion v{champion['champion_version']} ({champion['n']} paired test images)",
                  "", "| | value |", "|---|---|",
                  f"| challenger accuracy | {champion['challenger_accuracy']:.4f} |",
                  f"| champion accuracy | {champion['champion_accuracy']:.4f} |",
                  f"| difference, {champion['confidence']:.0%} lower bound (paired bootstrap) | "
                  f"{champion['lower_bound']:.4f} (margin -{champion['margin']}) |",
                  f"| only challenger right / only champion right | {champion['only_challenger_correct']} / "
                  f"{champion['only_champion_correct']} |",
                  f"| McNemar exact p-value | {champion['mcnemar_p_value']:.4g} |",
                  f"| not worse than champion | {'yes' if champion['passed'] else 'no'} |"]
    return "\n".join(lines) + "\n"

"""What the Kubeflow UI shows for a step: Markdown tables and PNGs embedded in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from components.artifacts import reports as reports_artifact
from components.artifacts.run_record import RunRecord


def _img(title: str, png: Path) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f'<h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"/>'


def png_html(title: str, png: Path) -> str:
    return f"<html><body>{_img(title, png)}</body></html>"


def validation_html(reports: Path) -> str:
    """The validate step's pictures and per-class table on one page."""
    rows = reports_artifact.per_class_rows(reports)
    table = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    parts = [_img(title, path) for title, path in reports_artifact.pictures(reports)]
    return f"<html><body><h3>Per class</h3><table border=1>{table}</table>{''.join(parts)}</body></html>"


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
    if report.get("warnings"):
        lines += ["", "**Warnings**", "", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def gate_markdown(gate: dict, run: RunRecord) -> str:
    verdict = "**PASSED**" if gate["passed"] else "**FAILED**: " + "; ".join(gate["reasons"])
    lines = [f"### Validation gate: {verdict}", "", f"MLflow run `{run.run_id}` ({run.run_name})", "",
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
                  f"| champion macro F1 / min class recall | {champion['champion_metrics']['macro_f1']:.4f} / "
                  f"{champion['champion_metrics']['min_class_recall']:.4f} |",
                  f"| difference, {champion['confidence']:.0%} lower bound (paired bootstrap) | "
                  f"{champion['lower_bound']:.4f} (margin -{champion['margin']}) |",
                  f"| only challenger right / only champion right | {champion['only_challenger_correct']} / "
                  f"{champion['only_champion_correct']} |",
                  f"| McNemar exact p-value | {champion['mcnemar_p_value']:.4g} |",
                  f"| not worse than champion | {'yes' if champion['passed'] else 'no'} |"]
    return "\n".join(lines) + "\n"

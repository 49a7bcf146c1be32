"""Software composition: a CycloneDX SBOM of the runtime dependencies, and a vulnerability audit.

    python infra/supply_chain.py sbom     # or: make sbom   -> build/sbom/runtime.cdx.json
    python infra/supply_chain.py audit    # or: make audit  -> build/audit.json
    python infra/supply_chain.py image IMAGE  # (make image does it) -> build/sbom/image.cdx.json

The SBOM lists what requirements.lock pins (what the component image installs), with package URLs.
The image's SBOM is read from the built image itself: every Debian package dpkg knows and every
Python distribution in its virtual environment.
The audit asks PyPI's vulnerability data about every pin (pip-audit). Where that service cannot be
reached it says "not audited" in as many words and records why: an audit that looked at nothing is
never reported as a pass. Known vulnerabilities fail it (exit 1), naming package, version and id.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCK = ROOT / "requirements.lock"


def sbom(out: Path, lock: Path = LOCK) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "cyclonedx-py"), "requirements", str(lock), "--output-format", "JSON",
                    "--output-file", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())


# Run inside the image: one line per Debian package, a separator, then the venv's distributions as JSON.
_LIST_IMAGE = ("dpkg-query -W -f '${binary:Package}\\t${Version}\\t${Architecture}\\n' && echo --- && "
               "python -c 'import importlib.metadata as m, json; "
               "print(json.dumps(sorted({d.metadata[\"Name\"]: d.version for d in m.distributions()}.items())))'")


def image_sbom(image: str, out: Path, podman: list[str] | None = None) -> dict:
    """CycloneDX 1.5 SBOM of a built image: its Debian packages and its Python distributions."""
    podman = podman or ["podman", "--runtime", "runc"]
    listing = subprocess.run([*podman, "run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024",
                              "--ulimit", "nproc=4096:4096", "--entrypoint", "sh", image, "-c", _LIST_IMAGE],
                             check=True, capture_output=True, text=True).stdout
    debs, pythons = listing.split("\n---\n")
    components = []
    for line in debs.splitlines():
        name, version, arch = line.split("\t")
        name = name.split(":")[0]
        components.append({"type": "library", "name": name, "version": version, "bom-ref": f"deb:{name}",
                           "purl": f"pkg:deb/debian/{name}@{quote(version)}?arch={arch}&distro=debian-12"})
    for name, version in json.loads(pythons):
        key = name.lower().replace("_", "-")
        components.append({"type": "library", "name": name, "version": version, "bom-ref": f"pypi:{key}",
                           "purl": f"pkg:pypi/{key}@{version}"})
    doc = {"bomFormat": "CycloneDX", "specVersion": "1.5", "serialNumber": f"urn:uuid:{uuid.uuid4()}", "version": 1,
           "metadata": {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "component": {"type": "container", "name": image, "bom-ref": image}},
           "components": components}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return doc


def verdict(report: dict) -> tuple[str, list[str]]:
    """("audited" | "not audited", lines) from pip-audit's JSON report."""
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    if not deps or len(skipped) == len(deps):
        reason = skipped[0]["skip_reason"] if skipped else "no dependencies listed"
        return "not audited", [f"not audited: the vulnerability service answered for none of {len(deps)} packages "
                               f"(no network to it?); first reason: {reason}"]
    found = [f"{d['name']} {d['version']}: {v['id']}" + (f" (fixed in {', '.join(v['fix_versions'])})"
                                                         if v.get("fix_versions") else "")
             for d in deps for v in d.get("vulns", [])]
    lines = [f"audited {len(deps) - len(skipped)} of {len(deps)} packages: "
             f"{len(found)} known vulnerabilit{'y' if len(found) == 1 else 'ies'}", *found]
    if skipped:
        lines.append(f"not audited: {', '.join(d['name'] for d in skipped)}")
    return "audited", lines


def audit(out: Path, lock: Path = LOCK) -> tuple[str, list[str], bool]:
    """(verdict, lines, passed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "audit.json"
        proc = subprocess.run([str(BIN / "pip-audit"), "-r", str(lock), "--no-deps", "--disable-pip",
                               "--progress-spinner", "off", "-f", "json", "-o", str(raw)],
                              capture_output=True, text=True)
        if not raw.exists():  # pip-audit could not start its queries at all
            report = {"dependencies": [], "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            report = json.loads(raw.read_text())
    state, lines = verdict(report)
    vulnerable = any(d.get("vulns") for d in report.get("dependencies", []))
    out.write_text(json.dumps({"verdict": state, "summary": lines, "report": report}, indent=2) + "\n")
    return state, lines, not vulnerable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sbom", "audit", "image"])
    parser.add_argument("image", nargs="?", help="image reference (image)")
    parser.add_argument("--out", type=Path,
                        help="default: build/sbom/runtime.cdx.json, build/audit.json or build/sbom/image.cdx.json")
    args = parser.parse_args(argv)
    if args.command == "image":
        if not args.image:
            parser.error("image: name the image, e.g. ghcr.io/finetune-pipeline/components:code-...")
        out = args.out or ROOT / "build" / "sbom" / "image.cdx.json"
        doc = image_sbom(args.image, out)
        debs = sum(c["purl"].startswith("pkg:deb/") for c in doc["components"])
        print(f"sbom: {args.image}: {debs} Debian packages, {len(doc['components']) - debs} Python "
              f"distributions in {out}")
        return 0
    if args.command == "sbom":
        out = args.out or ROOT / "build" / "sbom" / "runtime.cdx.json"
        doc = sbom(out)
        print(f"sbom: {len(doc['components'])} components (CycloneDX {doc['specVersion']}) in {out}")
        return 0
    out = args.out or ROOT / "build" / "audit.json"
    state, lines, passed = audit(out)
    for line in lines:
        print(f"audit: {line}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

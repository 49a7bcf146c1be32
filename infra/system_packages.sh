#!/usr/bin/env bash
# The Debian packages `make test` needs besides the Python ones (which `make setup` installs into .venv):
# Chromium (MLflow UI screenshots, driven by Playwright), npm (the Vega libraries for offline DVC plots),
# PostgreSQL (the MLflow database's set-up script, tests/test_infra.py),
# and podman, runc and debootstrap (the component image, built and run by tests/test_container.py).
# Missing ones are installed with apt-get as root, or with sudo where it asks no password; otherwise one
# line says what to install, and nothing starts.
set -euo pipefail

plain=()       # without their recommended packages
containers=()  # with them, as `apt-get install -y podman runc debootstrap` gets them
for tool in chromium npm; do command -v "$tool" >/dev/null || plain+=("$tool"); done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || plain+=(postgresql)
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || containers+=("$tool"); done
[ ${#plain[@]} -gt 0 ] || [ ${#containers[@]} -gt 0 ] || exit 0

missing=("${plain[@]}" "${containers[@]}")
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo="sudo"
else
  echo "setup: the tests need Debian packages that are missing; install them, then run again:" \
       "sudo apt-get install -y ${missing[*]}" >&2
  exit 2
fi
echo "setup: installing Debian packages: ${missing[*]}"
$sudo apt-get update -q
[ ${#plain[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${plain[@]}"
[ ${#containers[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${containers[@]}"

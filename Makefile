# `make run` and `make test` are the quick start; every target sets up .venv first when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256
PLOTS  := .dvc/plots/offline.html
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup system-packages venv lock run run-local demo-inputs generate init test exps ui screenshot stack stack-down image \
	run-container sbom audit reliability imagenet-zoo bench-transfer bench-speed bench-scale bench-serve lr-find bench-lr clean
.DEFAULT_GOAL := help

help:                          ## this list (a bare `make` prints it too)
	@echo "make <target>: start with \`make run\` (set-up and the default pipeline) and \`make test\`"
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: venv $(PLOTS)           ## .venv from requirements-dev.lock, and the offline plot template

# Chromium, npm, podman, runc, debootstrap from Debian: installed when missing (root), or named in one line.
system-packages:
	@bash infra/system_packages.sh

# Idempotent: skipped when .venv was built from exactly this requirements-dev.lock and pyproject.toml.
venv:
	@want=$$(cat requirements-dev.lock pyproject.toml | sha256sum | cut -d' ' -f1); \
	if [ -x $(PY) ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then \
		echo "setup: $(VENV) matches requirements-dev.lock"; \
	else \
		echo "setup: installing requirements-dev.lock into $(VENV) (first time: several minutes)"; \
		python3 -m venv $(VENV) && \
		$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock && \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . && \
		echo "$$want" > $(STAMP); \
	fi

# `dvc plots show` offline: the Vega libraries from the npm registry, inlined into DVC's HTML template.
$(PLOTS): infra/plots/package-lock.json infra/plots/offline_template.py
	@if command -v npm >/dev/null; then \
		(cd infra/plots && npm ci --no-audit --no-fund --silent) && \
		$(PY) infra/plots/offline_template.py $@ && \
		dvc config --local plots.html_template plots/offline.html; \
	else \
		echo "setup: npm not found: \`dvc plots show\` will load the Vega libraries from their CDN"; \
	fi

lock: setup                    ## requirements.lock (the image's runtime pins) from requirements.txt and requirements-dev.lock
	python infra/runtime_lock.py

run: setup                     ## the default pipeline with DVC: only stages whose inputs changed run
	dvc repro

demo-inputs: setup             ## the demo's digits and zoo checkpoint (DVC's two demo stages)
	dvc repro demo_zoo

run-local: demo-inputs         ## the Kubeflow DAG on this machine through kfp.local
	python -m pipelines run-local

generate: setup                ## rewrite dvc.yaml and pipelines/finetune_pipeline.yaml from pipelines/dag.py, params.yaml
	python -m pipelines generate

init: setup                    ## your own images: make init DATA=path/or/s3 WEIGHTS=torchvision://resnet50?weights=IMAGENET1K_V2
	@test -n "$(DATA)" -a -n "$(WEIGHTS)" || { echo "usage: make init DATA=<folder or s3://bucket/prefix> WEIGHTS=<pretrained URI> [ARCH=...] [LIBRARY=...] [NAME=...] [SHA256=...]"; exit 2; }
	python -m pipelines init --data "$(DATA)" --weights "$(WEIGHTS)" $(if $(ARCH),--arch "$(ARCH)") $(if $(LIBRARY),--library "$(LIBRARY)") $(if $(NAME),--name "$(NAME)") $(if $(SHA256),--sha256 "$(SHA256)")

test: system-packages setup  ## the test suite (installs what it needs first: Debian packages, .venv)
	python -m pytest

HEADLINE := test_accuracy|test_macro_f1|best_val_loss|best_epoch|gate_passed|compared_with
lr-find: setup                 ## the learning-rate range test on the last run's data and weights: a rate and lr_find.png
	python -m components.finetune --params params.yaml --dataset data/prepared --policy artifacts/augment --weights artifacts/pretrained --lr-find lr_find.png

exps: setup                    ## DVC experiments side by side: headline metrics and the settings that differ
	dvc exp show --only-changed --keep '$(HEADLINE)' --sort-by metrics/headline.json:test_accuracy --sort-order desc

ui: setup                      ## MLflow UI on the default local store; prints the runs page's URL once it answers
	python infra/mlflow_ui.py --store mlflow.db --port 5000

screenshot: setup              ## PNGs of the MLflow UI (runs, the latest run, the champion) in headless Chromium
	python infra/mlflow_screenshot.py --store mlflow.db --out screenshots

stack: setup                   ## SeaweedFS (S3) and an MLflow server on loopback; keys in .env
	python infra/local_stack.py up

stack-down:
	python infra/local_stack.py down

image: setup                   ## the component image with podman, and its SBOM in build/sbom/image.cdx.json
	python infra/container.py build

run-container: setup           ## build the image, run the whole compiled pipeline in it (kfp.local DockerRunner)
	python infra/container.py run

sbom: setup                    ## CycloneDX SBOM of the runtime dependencies -> build/sbom/runtime.cdx.json
	python infra/supply_chain.py sbom

audit: setup                   ## known vulnerabilities in requirements.lock (says "not audited" without network)
	python infra/supply_chain.py audit

reliability: setup            ## bad inputs and injected faults per step -> the README's reliability table
	python benchmarks/reliability.py

PEERS := build/peers/.installed
$(PEERS): benchmarks/requirements-peers.txt
	rm -rf build/peers && $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target build/peers -r $< \
		&& touch $@

bench-speed: setup $(PEERS)   ## README "Speed": against the tutorial, Lightning, a careful loop, the FLOP limit; scale rows
	python benchmarks/finetune_speed.py
	python benchmarks/scale.py

bench-scale: setup            ## the scale rows alone: the steps on 1,000 to 20,000 photos, under a memory limit
	python benchmarks/scale.py

bench-serve: setup            ## the registered model served to 32 concurrent clients, 1 and 2 workers (~12 min)
	python benchmarks/serve_load.py

imagenet-zoo: setup            ## real ImageNet weights offline: zoo/efficientnet_lite0-imagenet.pt (timm), checked on photos
	python -m pipelines imagenet-zoo

bench-transfer: setup          ## ImageNet weights vs random init vs a linear probe, photographs at 224 px (~30 min)
	python benchmarks/transfer.py

bench-lr: setup                ## finetune.lr auto (the range test) against fixed rates, photographs at 224 px (~15 min)
	python benchmarks/lr_range.py

clean:                         ## pipeline outputs and the local MLflow store (not .venv)
	rm -rf data/raw data/prepared zoo/*.pt artifacts local_outputs checkpoints mlflow.db mlruns dvc_plots screenshots lr_find.png \
		.container-run container-run.json build

# `make run` and `make test` are the quick start; every target sets up .venv first when needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run run-local demo-inputs compile test ui stack stack-down bench-transfer clean

# Idempotent: skipped when .venv was built from exactly this requirements.lock and pyproject.toml.
setup:
	@want=$$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1); \
	if [ -x $(PY) ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then \
		echo "setup: $(VENV) matches requirements.lock"; \
	else \
		echo "setup: installing requirements.lock into $(VENV) (first time: several minutes)"; \
		python3 -m venv $(VENV) && \
		$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock && \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . && \
		echo "$$want" > $(STAMP); \
	fi

run: setup                     ## the default pipeline with DVC: only stages whose inputs changed run
	dvc repro

demo-inputs: setup             ## the demo's digits and zoo checkpoint (DVC's two demo stages)
	dvc repro demo_zoo

run-local: demo-inputs         ## the Kubeflow DAG on this machine through kfp.local
	python -m pipelines run-local

compile: setup                 ## rewrite pipelines/finetune_pipeline.yaml from pipelines/ and params.yaml
	python -m pipelines compile

test: setup
	python -m pytest

ui: setup                      ## MLflow UI on the default local store
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

stack: setup                   ## SeaweedFS (S3) and an MLflow server on loopback; keys in .env
	python infra/local_stack.py up

stack-down:
	python infra/local_stack.py down

bench-transfer: setup          ## zoo checkpoint vs random initialisation on the default task
	python benchmarks/transfer.py

clean:                         ## pipeline outputs and the local MLflow store (not .venv)
	rm -rf data/raw data/prepared zoo/*.pt artifacts local_outputs checkpoints mlflow.db mlruns

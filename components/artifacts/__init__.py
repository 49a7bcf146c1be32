"""The artifacts the steps hand each other: one module each, the only code that knows their files.

    dataset.py       data -> every later step: manifest.csv, report.json, source.json (images/ for DVC sources)
    policy.py        augment -> finetune, MLflow: policy.json, preview.png
    weights.py       fetch_pretrained -> finetune: weights.pt, pretrained.json
    model.py         finetune -> validate: model.pt, history.json, summary.json, training_curves.png, run.json
    reports.py       validate -> register: metrics.json, gate.json, the tables and pictures, run.json
    registration.py  register: registration.json
    checkpoint.py    the checkpoint format of weights.pt, model.pt and a zoo file
    run_record.py    which MLflow run a model or its reports belong to

Each gives its files' names, a typed reader and an all-or-nothing writer; a step reads and writes
artifacts only through them (tests/test_artifacts.py fails when another module names their files).
"""

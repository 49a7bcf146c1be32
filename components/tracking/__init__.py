"""The MLflow side: where runs go, the live run of a fine-tune, what validation adds, the registry.

    store.py          where runs go ($MLFLOW_TRACKING_URI or the workspace's mlflow.db), the client
    runs.py           the live run of a fine-tune: parameters, lineage tags, a name, epochs as they end
    validation.py     what validation adds to that run: test metrics, reports, the servable model
    registry.py       who is champion, and the lock under which aliases move
    __main__.py       `python -m components.tracking target`: DVC's record of where runs go now
"""

"""S3 settings for this process only. On Kubeflow the task's S3 endpoint and keys arrive as FINETUNE_AWS_*
(pipelines/finetune_pipeline.py), not AWS_*: KFP's launcher, the parent process of every task, reads AWS_*
from the same container for its own artifact uploads (kubeflow/pipelines 2.17.0,
backend/src/v2/config/s3.go:87-95, backend/src/v2/objectstore/object_store.go:318-330), and the pipeline's
data keys must not steer those. `adopt()` gives them their usual names in this process, for boto3 and DVC.
"""

from __future__ import annotations

import os

PREFIX = "FINETUNE_"


def adopt(environ=os.environ) -> list[str]:
    """Copy each FINETUNE_AWS_* variable to its AWS_* name (one set explicitly wins); the names copied."""
    copied = []
    for name, value in list(environ.items()):
        if name.startswith(PREFIX + "AWS_") and value:
            target = name.removeprefix(PREFIX)
            if target not in environ:
                environ[target] = value
                copied.append(target)
    return copied

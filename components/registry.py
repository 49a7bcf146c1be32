"""The MLflow model registry as the pipeline uses it: who is champion, and a lock to change that.

MLflow has no compare-and-set for aliases, so promotion takes a lock first. The lock is a
registered model named `<name>--promotion-lock`: creating a registered model is one INSERT
on the tracking server's database, which a second creator fails with RESOURCE_ALREADY_EXISTS,
so at most one pipeline holds it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time

from mlflow.exceptions import MlflowException


def current_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout: float = 300, stale_after: float = 900):
    """Hold the registry-wide lock for `name` while the block runs."""
    lock = f"{name}--promotion-lock"
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner},
                                           description="held while a pipeline moves the aliases of " + name)
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(MlflowException):  # a holder that died long ago leaves a stale lock
            held = client.get_registered_model(lock)
            if time.time() - held.creation_timestamp / 1000 > stale_after:
                client.delete_registered_model(lock)
                continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"registry lock {lock} still held after {timeout:.0f} s")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        client.delete_registered_model(lock)

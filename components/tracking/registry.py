"""The MLflow model registry as the pipeline uses it: who is champion, and a lock to change that.

MLflow has no compare-and-set for aliases, so promotion takes a lock first. The lock is a
registered model named `<name>--promotion-lock`: creating a registered model is one INSERT
on the tracking server's database, which a second creator fails with RESOURCE_ALREADY_EXISTS,
so at most one pipeline holds it. Its tags name the holder and carry a lease the holder renews.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException


def current_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


LEASE_S = 30.0  # a holder renews its lease every third of this; a lock whose lease ran out is broken


def _holder(tags: dict) -> str:
    return f"{tags.get('owner', 'an unknown holder')} (since {tags.get('started', '?')})"


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout: float = 300, lease: float = LEASE_S):
    """Hold the registry-wide lock for `name` while the block runs.

    The lock (a registered model) records its holder (host:pid) and start time, and a lease that a
    thread of the holder renews; a lock whose lease ran out (its holder was killed) is broken by
    the next waiter within seconds. A waiter that gives up says who holds it and how to clear it.
    """
    lock = f"{name}--promotion-lock"
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner, "started": started,
                                                       "lease_until": f"{time.time() + lease:.3f}"},
                                           description=f"held while a pipeline moves the aliases of {name}; "
                                                       f"delete it to clear a lock whose holder is gone")
            break
        except MlflowException as err:
            # Taken: RESOURCE_ALREADY_EXISTS. Or taken and just released: MLflow's SQL store answers a
            # duplicate name by reading the existing model (mlflow 3.17.2, store/model_registry/
            # sqlalchemy_store.py, create_registered_model: get_registered_model after IntegrityError), which
            # is RESOURCE_DOES_NOT_EXIST when its holder deleted it in between. Either way: wait, try again.
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        held = {}
        with contextlib.suppress(MlflowException):
            held = client.get_registered_model(lock).tags
            # Expired lease: the holder stopped renewing (killed). Re-read just before deleting so a lock
            # another waiter has just taken is left alone (MLflow has no compare-and-delete: the window
            # between the read and the delete is all that is left of the race).
            if held and float(held.get("lease_until", 0)) < time.time():
                if client.get_registered_model(lock).tags == held:
                    client.delete_registered_model(lock)
                    print(f"registry: broke the lock on {name} held by {_holder(held)}: its lease ran out",
                          file=sys.stderr)
                    continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"registry lock {lock} still held after {timeout:.0f} s by {_holder(held)}; its "
                               f"lease is renewed while that process lives. If it is gone, the lock expires within "
                               f"{lease:.0f} s; to clear it now: "
                               f"mlflow.MlflowClient().delete_registered_model('{lock}')")
        # B311: jitter, not a secret
        time.sleep(0.2 + random.random() * 0.3)  # nosec B311
    stop = threading.Event()

    def renew():
        while not stop.wait(lease / 3):
            with contextlib.suppress(Exception):  # a missed renewal costs nothing while others remain
                client.set_registered_model_tag(lock, "lease_until", f"{time.time() + lease:.3f}")

    renewer = threading.Thread(target=renew, name=f"lease {lock}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(MlflowException):  # ours only: a lock taken over after our lease ran out is not
            if client.get_registered_model(lock).tags.get("owner") == owner:
                client.delete_registered_model(lock)

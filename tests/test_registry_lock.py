"""The registry lock on a real `mlflow server`: who holds it, a lease its holder renews, and a lock
left by a killed holder broken in seconds."""

import threading
import time

import mlflow
import pytest

from components.tracking.registry import promotion_lock


@pytest.fixture
def client(mlflow_server):
    return mlflow.MlflowClient(mlflow_server)


def test_a_lock_left_by_a_killed_holder_is_broken_within_seconds(client, capfd):
    # What a register killed while holding the lock leaves: its lease stops being renewed.
    client.create_registered_model("dead--promotion-lock", tags={
        "owner": "node-7:4242:1", "started": "2026-11-22T03:00:00+00:00", "lease_until": f"{time.time() + 1:.3f}"})
    started = time.monotonic()
    with promotion_lock(client, "dead", timeout=30, lease=2):
        waited = time.monotonic() - started
        assert client.get_registered_model("dead--promotion-lock").tags["owner"] != "node-7:4242:1"
    assert waited < 4  # the lease's second, then one try: not the 15 minutes of a creation-time rule
    assert "broke the lock on dead held by node-7:4242:1 (since 2026-11-22T03:00:00+00:00)" in capfd.readouterr().err
    with pytest.raises(mlflow.exceptions.MlflowException):  # released
        client.get_registered_model("dead--promotion-lock")


def test_a_live_holder_keeps_its_lock_past_the_lease_and_a_waiter_is_told_who_holds_it(client):
    holding, release = threading.Event(), threading.Event()

    def holder():
        with promotion_lock(client, "busy", lease=1):
            holding.set()
            release.wait(20)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(20)
    try:
        with pytest.raises(TimeoutError) as err:  # 3 s: three leases; renewal keeps it held throughout
            with promotion_lock(client, "busy", timeout=3, lease=1):
                pass
        message = str(err.value)
        assert "registry lock busy--promotion-lock still held after 3 s by " in message and ":" in message
        assert "delete_registered_model('busy--promotion-lock')" in message
    finally:
        release.set()
        thread.join()
    with promotion_lock(client, "busy", timeout=10, lease=1):  # released by its holder: free at once
        pass


def test_a_lock_released_while_a_waiter_asks_for_it_is_taken_not_an_error(tmp_path):
    """MLflow's SQL store answers a taken name by reading the model that holds it; when its holder deletes
    it in between, the waiter's create fails with RESOURCE_DOES_NOT_EXIST (seen in two registers racing on a
    real server). Here that moment is made to happen every time, on a real SQLite store: the holder's delete
    is slipped in just before the store reads the taken name."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as SqlAlchemyModelRegistryStore

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    client.create_registered_model("race--promotion-lock", tags={"owner": "the holder", "lease_until": "9e12"})
    real_get = SqlAlchemyModelRegistryStore.get_registered_model
    released = []

    def holder_releases_first(store, name):
        if name == "race--promotion-lock" and not released:
            released.append(name)
            store.delete_registered_model(name)  # the holder finishes between the INSERT and this read
        return real_get(store, name)

    try:
        SqlAlchemyModelRegistryStore.get_registered_model = holder_releases_first
        with promotion_lock(client, "race", timeout=10):
            SqlAlchemyModelRegistryStore.get_registered_model = real_get
            assert released and client.get_registered_model("race--promotion-lock").tags["owner"] != "the holder"
    finally:
        SqlAlchemyModelRegistryStore.get_registered_model = real_get

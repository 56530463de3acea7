"""What keeps an iteration's start-up short: the training worker starts its data stream before
loading the models, the controller's import of spin_ray.trainer stays light, and a private
local Ray gets the laptop settings of spin_ray.ray_session.LOCAL_ENV."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
from console_helpers import Output

import spin_ray.ray_session
from spin_ray.trainer import StartedIterator


class Recorder:
    """An iterable that records which thread fetched each item and can block the first fetch."""

    def __init__(self, items, *, fail_first: Exception | None = None):
        self.items, self.fail_first = list(items), fail_first
        self.first_fetch_started = threading.Event()
        self.threads: list[str] = []

    def __iter__(self):
        self.first_fetch_started.set()
        if self.fail_first is not None:
            raise self.fail_first
        for item in self.items:
            self.threads.append(threading.current_thread().name)
            yield item


def test_started_iterator_fetches_the_first_item_before_anyone_iterates():
    source = Recorder(range(3))
    started = StartedIterator(source)
    assert source.first_fetch_started.wait(timeout=10), "the first fetch did not start on construction"
    assert started._thread.daemon, "a worker that fails before iterating must still be able to exit"
    assert list(started) == [0, 1, 2]
    assert source.threads[0].startswith("first-batch")
    assert source.threads[1] == source.threads[2] == threading.current_thread().name


def test_started_iterator_of_nothing_is_empty():
    assert list(StartedIterator([])) == []


def test_started_iterator_raises_what_the_first_fetch_raised_in_the_caller():
    started = StartedIterator(Recorder([1], fail_first=RuntimeError("dataset shard unreadable")))
    with pytest.raises(RuntimeError, match="dataset shard unreadable"):
        list(started)


def test_importing_the_trainer_does_not_import_diffusers():
    """Ray Train's controller imports spin_ray.trainer to unpickle the training function; diffusers
    (seconds of CPU) is imported by the workers when they load the models."""
    code = "import sys, spin_ray.trainer; print('diffusers' in sys.modules, 'spin_ray.train_step' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init and ray.is_initialized replaced by a recorder; the environment and Ray Data's
    progress setting restored after."""
    import ray
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "use_ray_tqdm", True)
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    seen_env: list[str | None] = []

    def init(**kwargs):
        calls.append(kwargs)
        seen_env.append(os.environ.get(spin_ray.ray_session.API_SERVER_ENV))

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(spin_ray.ray_session, "_seen_env", seen_env, raising=False)
    monkeypatch.setattr(spin_ray.ray_session, "_settings", {"verbose": False})
    for name in [*spin_ray.ray_session.LOCAL_ENV, "RAY_ADDRESS", spin_ray.ray_session.API_SERVER_ENV]:
        monkeypatch.setenv(name, "unset")  # so that monkeypatch restores the variable's absence too
        monkeypatch.delenv(name)
    return calls


def test_a_local_instance_gets_the_laptop_settings(fake_ray, monkeypatch):
    import os

    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "5")  # the user's own value wins
    assert spin_ray.ray_session.ensure_ray(None, num_cpus=3) is True
    (init,) = fake_ray
    port = init.pop("dashboard_port")
    assert init == {"address": "local", "num_cpus": 3, "include_dashboard": None, "dashboard_host": "127.0.0.1",
                    "log_to_driver": False, "logging_level": logging.WARNING}
    # Ray's own processes (Train's PlacementGroupCleaner), started during ray.init, find the
    # state API of this instance; processes this driver starts afterwards are not sent there
    assert spin_ray.ray_session._seen_env == [f"http://127.0.0.1:{port}"]
    assert spin_ray.ray_session.API_SERVER_ENV not in os.environ
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "5"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == spin_ray.ray_session.LOCAL_ENV[
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    # the raylet's wait for its agents: Ray's 15 s aborted the node on a busy laptop
    assert int(os.environ["RAY_agent_register_timeout_ms"]) >= 60_000


def test_a_cluster_keeps_rays_defaults(fake_ray, monkeypatch):
    import os

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert spin_ray.ray_session.ensure_ray() is False
    assert fake_ray == [{"address": "10.0.0.1:6379", "log_to_driver": False, "logging_level": logging.WARNING}]
    assert not set(spin_ray.ray_session.LOCAL_ENV) & set(os.environ)


def test_address_local_starts_a_private_instance_even_inside_a_cluster_job(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert spin_ray.ray_session.ensure_ray("local", num_cpus=4) is True
    assert fake_ray[0]["address"] == "local" and fake_ray[0]["dashboard_host"] == "127.0.0.1"


def test_verbose_lets_rays_output_through(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    spin_ray.ray_session.set_verbose(True)
    spin_ray.ray_session.ensure_ray()
    assert fake_ray == [{"address": "10.0.0.1:6379", "log_to_driver": True}]


def test_the_free_port_is_free_on_loopback():
    import socket

    port = spin_ray.ray_session.free_loopback_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # raises if something listens there


@pytest.mark.parametrize("tty", [False, True])
def test_data_progress_is_logged_as_lines_unless_output_is_a_terminal(fake_ray, monkeypatch, tty):
    from ray.data import DataContext

    monkeypatch.setattr(sys, "stdout", Output(tty))
    spin_ray.ray_session.ensure_ray("local")
    assert DataContext.get_current().use_ray_tqdm is tty

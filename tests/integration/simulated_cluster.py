"""A simulated autoscaling Ray cluster on this machine (Ray's fake multi-node provider).

``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1`` runs the real
autoscaler (its monitor process) against a node provider that starts each "node" as a local
raylet with the resources of its node type. The node types mirror cluster.yaml's: a head with
no CPUs (the driver, the autoscaler and the dashboard only), a generation type and a training
type, each from 0 nodes up and marked with the custom resource that the config's
``cluster.generation_node_label`` / ``cluster.train_node_label`` ask for.

Not ``ray.cluster_utils.AutoscalingCluster``: its start() and shutdown() run ``ray stop --force``,
which ends every Ray process on the machine. The head here runs on free ports with its own temp
dir, and every process it starts carries the test's tag, by which the test ends exactly those.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ray_processes import RAY_BIN, free_port, head_command, tagged_env, wait_for_job_server

GEN_LABEL = "spin_gen"
TRAIN_LABEL = "spin_train"
IDLE_TIMEOUT_MINUTES = 0.1
"""Worker nodes idle this long are released (6 s, so the test sees it happen)."""


def autoscaling_config(gcs_port: int, node_cpus: int = 2) -> dict:
    """The fake provider's cluster config: node types as cluster.yaml's, CPU-sized for a laptop."""

    def worker(label: str) -> dict:
        return {"resources": {"CPU": node_cpus, label: 1, "object_store_memory": 150_000_000},
                "node_config": {}, "min_workers": 0, "max_workers": 1}

    return {
        "cluster_name": "spin_ray_simulated", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "gpu_gen": worker(GEN_LABEL),
            "gpu_train": worker(TRAIN_LABEL),
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@dataclass
class SimulatedCluster:
    head: subprocess.Popen
    address: str
    """The job server's (dashboard's) HTTP address."""
    gcs_address: str
    env: dict[str, str]
    log: Path


def start(temp_dir: Path, log_dir: Path, tag: str) -> SimulatedCluster:
    """The head of a simulated cluster, its job server answering; the caller stops it
    (``ray_processes.stop_head``)."""
    gcs_port, dashboard_port = free_port(), free_port()
    config_file = log_dir / "autoscaling.json"
    config_file.write_text(json.dumps(autoscaling_config(gcs_port)))
    # A loaded machine can take over 15 s to start a node's dashboard agent, which its raylet waits
    # for and then aborts; 2 minutes instead.
    env = tagged_env(tag, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_agent_register_timeout_ms="120000")
    log = log_dir / "ray_head.log"
    head = subprocess.Popen(
        head_command(gcs_port, dashboard_port, temp_dir, "--num-cpus=0", "--num-gpus=0",
                     f"--autoscaling-config={config_file}"),
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    wait_for_job_server(address, head, log, timeout=240)
    return SimulatedCluster(head, address, f"127.0.0.1:{gcs_port}", env, log)


def nodes(cluster: SimulatedCluster) -> list[dict]:
    """Every node the cluster has had (alive and dead), from Ray's state API."""
    result = subprocess.run([str(RAY_BIN), "list", "nodes", f"--address={cluster.address}", "--detail",
                             "--format=json", "--limit=1000"], env=cluster.env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    if not result.stdout.lstrip().startswith("["):  # "No resource in the cluster": the state API has no node yet
        return []
    return json.loads(result.stdout)


def alive_workers(cluster: SimulatedCluster, label: str) -> int:
    return sum(1 for node in nodes(cluster) if node["state"] == "ALIVE" and label in node["resources_total"])


def wait_until_released(cluster: SimulatedCluster, timeout: float) -> float:
    """Seconds until no worker node is alive (the autoscaler released them), or AssertionError."""
    started = time.time()
    while time.time() - started < timeout:
        if not any(alive_workers(cluster, label) for label in (GEN_LABEL, TRAIN_LABEL)):
            return time.time() - started
        time.sleep(2)
    raise AssertionError(f"worker nodes still alive {timeout}s after the job: {nodes(cluster)}")

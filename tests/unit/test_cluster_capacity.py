"""The capacity check: an iteration's actors, workers and data task placed together, or a
message naming what is missing (issue #19 item 5, #21 item 2)."""

from __future__ import annotations

import pytest

from spin_ray.cluster_capacity import ClusterTooSmallError, Request, check_fits, iteration_requests, unplaced
from spin_ray.config import load_config


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def test_a_two_cpu_head_cannot_hold_the_generator_the_trainer_and_the_repartition():
    # The stall of the issue: one generation actor and one training worker take both CPUs.
    with pytest.raises(ClusterTooSmallError) as err:
        check_fits(cfg_with("generation.num_actors=1", "train.num_workers=1"), [{"CPU": 2.0, "memory": 1e9}])
    message = str(err.value)
    assert "Ray Data's read/repartition task" in message and "CPU: 2" in message and "--num-cpus" in message


def test_three_cpus_are_enough_for_one_actor_and_one_worker():
    check_fits(cfg_with("generation.num_actors=1", "train.num_workers=1"), [{"CPU": 3.0}])


def test_each_bundle_needs_one_node():
    # 4 CPUs in total, but a GPU worker needs its CPU and GPU on the same node.
    cfg = cfg_with("generation.num_actors=1", "generation.gpus_per_actor=1", "train.num_workers=1", "train.use_gpu=true")
    assert unplaced(iteration_requests(cfg), [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0}]) == [
        "training workers (train.num_workers)"]
    assert unplaced(iteration_requests(cfg), [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]) == []


def test_node_labels_pin_work_to_the_labelled_nodes():
    cfg = cfg_with("cluster.generation_node_label=gen", "cluster.train_node_label=train")
    nodes = [{"CPU": 4.0, "gen": 1.0}, {"CPU": 4.0}]  # no node offers "train"
    assert unplaced(iteration_requests(cfg), nodes) == ["training workers (train.num_workers)"]
    assert unplaced(iteration_requests(cfg), [*nodes, {"CPU": 1.0, "train": 1.0}]) == []


def test_counts_multiply_and_the_largest_bundles_go_first():
    requests = [Request("small", 3, {"CPU": 1.0}), Request("big", 1, {"CPU": 2.0})]
    # First fit in the given order would put two smalls on the 2-CPU node and leave "big" out.
    assert unplaced(requests, [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 2.0}]) == []
    assert unplaced(requests, [{"CPU": 2.0}, {"CPU": 2.0}]) == ["small"]

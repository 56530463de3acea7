"""Offline checks of the deployment files: cluster.yaml, docker/Dockerfile, deploy/rayjob.yaml
and the commands in docs/CLUSTER.md.

cluster.yaml goes through the same steps `ray up` takes before it talks to AWS
(``prepare_config`` then the autoscaler's JSON schema); the RayJob's cluster spec goes through
the function Ray's autoscaler uses inside KubeRay to read a RayCluster. Both come from the
installed Ray, which pyproject.toml pins to the version of the image.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from spin_ray.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
CLUSTER_DOC = REPO / "docs" / "CLUSTER.md"
SD15_CONFIG = REPO / "configs" / "sd15_pickapic.yaml"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(RAYJOB_YAML)


@pytest.fixture(scope="module")
def sd15() -> Config:
    return load_config(SD15_CONFIG)


def pinned_ray_version() -> str:
    """The X.Y.Z of the ``ray[...]==X.Y.Z`` requirement in pyproject.toml."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", dep.replace(" ", "")) for dep in dependencies]
    versions = [pin.group(2) for pin in pins if pin]
    assert len(versions) == 1, f"expected one exact ray pin in pyproject.toml, got {dependencies}"
    return versions[0]


def gpu_worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and node_type["resources"].get("GPU", 0) > 0
    }


def node_types_offering(cluster: dict[str, Any], resource: str) -> list[str]:
    return [name for name, node_type in cluster["available_node_types"].items() if resource in node_type["resources"]]


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_what_ray_up_checks_before_aws(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["cluster_name"] == "spin-ray"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    # Left out, these lists would merge in Ray's AWS defaults, which pip-install another Ray.
    assert prepared["head_setup_commands"] == [] and prepared["worker_setup_commands"] == []


def test_schema_validation_rejects_a_misspelled_field(cluster):
    broken = prepare_config(copy.deepcopy(cluster))
    broken["available_node_types"]["gpu_gen"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(broken)


def test_head_offers_no_gpus_and_no_task_cpus(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert head["resources"].get("CPU") == 0
    for command in cluster["head_start_ray_commands"]:
        assert set(re.findall(r"--num-gpus[= ](\S+)", command)) <= {"0"}, command
    assert not any("--gpus" in option for option in cluster["docker"].get("head_run_options", []))
    assert not any("--gpus" in option for option in cluster["docker"]["run_options"])


def test_dashboard_listens_on_loopback_in_every_head_start(cluster):
    head_starts = [c for c in cluster["head_start_ray_commands"] if re.search(r"\bray start\b.*--head", c)]
    assert head_starts, "no `ray start --head` in head_start_ray_commands"
    for command in head_starts:
        assert re.findall(r"--dashboard-host[= ](\S+)", command) == ["127.0.0.1"], command
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_start_commands_use_only_real_ray_start_flags(cluster):
    from ray.scripts.scripts import cli

    known = {opt for param in cli.commands["start"].params for opt in param.opts + param.secondary_opts}
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        for piece in command.split(";"):
            words = shlex.split(piece)
            if words[:2] == ["ray", "start"]:
                flags = {word.split("=")[0] for word in words[2:] if word.startswith("-")}
                assert flags <= known, f"unknown `ray start` flags {flags - known} in {command!r}"


def test_gpu_worker_types_scale_from_zero(cluster):
    gpu_types = gpu_worker_types(cluster)
    assert len(gpu_types) >= 2, "expected a generation and a training node type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
    assert sum(t["max_workers"] for t in gpu_types.values()) <= cluster["max_workers"]
    assert "--gpus all" in cluster["docker"]["worker_run_options"]


def check_node_labels(cluster: dict[str, Any], sd15: Config) -> None:
    """The config's node labels are custom resources of distinct GPU node types."""
    gen_label, train_label = sd15.cluster.generation_node_label, sd15.cluster.train_node_label
    assert gen_label and train_label and gen_label != train_label
    gpu_types = gpu_worker_types(cluster)
    gen_types, train_types = node_types_offering(cluster, gen_label), node_types_offering(cluster, train_label)
    assert gen_types and set(gen_types) <= set(gpu_types)
    assert train_types and set(train_types) <= set(gpu_types)
    assert not set(gen_types) & set(train_types), "generation and training should run on different node types"


def check_capacity(cluster: dict[str, Any], sd15: Config) -> None:
    """At full size, the labelled node types hold the config's actors and training workers."""
    types = cluster["available_node_types"]
    gen = [types[name] for name in node_types_offering(cluster, sd15.cluster.generation_node_label)]
    train = [types[name] for name in node_types_offering(cluster, sd15.cluster.train_node_label)]
    gen_gpus = sum(t["resources"]["GPU"] * t["max_workers"] for t in gen)
    assert sd15.generation.num_actors * sd15.generation.gpus_per_actor <= gen_gpus
    assert sd15.data.prepare_num_actors * sd15.data.prepare_gpus_per_actor <= gen_gpus
    # All training workers on one node: gradient all-reduce stays on the node's NVLink.
    assert sd15.train.use_gpu
    assert any(t["resources"]["GPU"] >= sd15.train.num_workers for t in train)


def test_node_labels_of_the_config_are_custom_resources_of_gpu_node_types(cluster, sd15):
    check_node_labels(cluster, sd15)


def test_cluster_holds_the_sd15_actors_and_workers(cluster, sd15):
    check_capacity(cluster, sd15)


def test_every_node_runs_token_auth_with_the_mounted_token(cluster):
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_workers_reach_s3_through_an_instance_profile(cluster):
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} has no IamInstanceProfile"


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_builds_on_the_ray_gpu_image_of_the_pinned_ray():
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert froms == [f"rayproject/ray:{pinned_ray_version()}-py311-gpu"]
    assert pinned_ray_version() == ray.__version__ == "2.60.0"


def test_dockerfile_installs_the_project_without_dev_extras():
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    installs = [shlex.split(args) for args in runs if "pip install" in args]
    assert any("." in words[words.index("install") + 1 :] for words in installs), installs
    assert "[dev]" not in DOCKERFILE.read_text()


def test_dockerfile_copies_existing_paths_including_the_package():
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    for source in sources:
        assert (REPO / source).exists(), f"docker/Dockerfile copies {source}, which is not in the repository"
    assert {"pyproject.toml", "spin_ray", "jobs", "configs"} <= set(sources)


def test_dockerfile_keeps_the_non_root_user_of_the_base_image():
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert all(user.split(":")[0] not in ("root", "0") for user in users)
    copies = [args for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert all("--chown=ray:users" in args for args in copies)


# ----------------------------------------------------------------------------- deploy/rayjob.yaml


def pod_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert "python jobs/self_play.py --config configs/sd15_pickapic.yaml" in spec["entrypoint"]
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    head = cluster_spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert all(c["name"] and c["image"] for c in head["template"]["spec"]["containers"])
    assert cluster_spec["workerGroupSpecs"]
    for group in cluster_spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert all(c["name"] and c["image"] for c in group["template"]["spec"]["containers"])


def test_rayjob_worker_groups_ask_for_gpus_and_start_at_zero(rayjob):
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert group["minReplicas"] == 0, group["groupName"]


def test_ray_autoscaler_reads_the_rayjob_cluster_like_cluster_yaml(rayjob, sd15):
    ray_cluster = {"metadata": {"name": "spin-ray", "namespace": "default"}, "spec": rayjob["spec"]["rayClusterSpec"]}
    autoscaling = _derive_autoscaling_config_from_ray_cr(ray_cluster)  # validates against Ray's schema too
    head = autoscaling["available_node_types"][autoscaling["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    check_node_labels(autoscaling, sd15)
    check_capacity(autoscaling, sd15)
    assert rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_rayjob_job_server_stays_inside_the_cluster_and_needs_the_token(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert cluster_spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert cluster_spec["authOptions"] == {"mode": "token"}


def test_rayjob_reads_s3_credentials_from_a_secret(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    for template in templates:
        for container in pod_containers(template):
            assert {"secretRef": {"name": "spin-ray-s3"}} in container.get("envFrom", []), container["name"]
            literal = {e["name"] for e in container.get("env", []) if "value" in e}
            assert not literal & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, container["name"]


def test_rayjob_runs_from_the_images_copy_of_the_repository(rayjob):
    working_dir = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"]
    workdirs = [args for instruction, args in dockerfile_instructions() if instruction == "WORKDIR"]
    assert workdirs[-1] == working_dir


def test_one_image_everywhere(cluster, rayjob):
    image = cluster["docker"]["image"]
    assert image.endswith("/spin-ray:latest")
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    assert {c["image"] for t in templates for c in t["spec"]["containers"]} == {image}
    assert f"docker build -f docker/Dockerfile -t {image} ." in DOCKERFILE.read_text()


# ----------------------------------------------------------------------------- docs/CLUSTER.md


def doc_commands(prefix: str) -> list[list[str]]:
    """Shell commands starting with ``prefix`` in the fenced or indented code of docs/CLUSTER.md."""
    text = re.sub(r"\\\n\s*", " ", CLUSTER_DOC.read_text())
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(prefix + " "):
            commands.append(shlex.split(line, comments=True))
    return commands


def test_ray_commands_in_the_docs_use_real_ray_2_60_flags():
    import click
    from ray.scripts.scripts import cli

    commands = doc_commands("ray")
    assert len(commands) >= 10
    for words in commands:
        command: click.Command = cli
        rest = words[1:]
        while isinstance(command, click.Group) and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]
        assert command is not cli, f"unknown ray command in docs: {' '.join(words)}"
        options = rest[: rest.index("--")] if "--" in rest else rest
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        flags = {word.split("=")[0] for word in options if word.startswith("-")}
        assert flags <= known, f"docs use {flags - known}, unknown to `{' '.join(words[:3])}`"


def test_docs_submit_the_sd15_config_to_the_tunnelled_job_server():
    submits = [w for w in doc_commands("ray") if w[1:3] == ["job", "submit"]]
    assert submits
    for words in submits:
        assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"
        assert "--working-dir" in words
        entrypoint = words[words.index("--") + 1 :]
        assert entrypoint[:4] == ["python", "jobs/self_play.py", "--config", "configs/sd15_pickapic.yaml"]
        assert any(word.startswith("run_dir=s3://") for word in entrypoint)
        load_config(REPO / entrypoint[3], [w for w in entrypoint[4:] if "=" in w])

"""Offline checks of the deployment files: cluster.yaml, docker/Dockerfile, deploy/*.yaml
and the commands in docs/CLUSTER.md, including their security properties (issue 23, findings
2, 6 and 7): no static AWS keys, non-root pods without capabilities, network policies, a
restricted security group, least-privilege IAM policies, and images pinned by an explicit
tag or a digest, never ``:latest``.

cluster.yaml goes through the same steps `ray up` takes before it talks to AWS
(``prepare_config`` then the autoscaler's JSON schema); the RayJob's cluster spec goes through
the function Ray's autoscaler uses inside KubeRay to read a RayCluster. Both come from the
installed Ray, which pyproject.toml pins to the version of the image.
"""

from __future__ import annotations

import copy
import json
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
NETWORK_POLICY_YAML = REPO / "deploy" / "networkpolicy.yaml"
SERVICE_ACCOUNTS_YAML = REPO / "deploy" / "serviceaccounts.yaml"
CLUSTER_DOC = REPO / "docs" / "CLUSTER.md"
SD15_CONFIG = REPO / "configs" / "sd15_pickapic.yaml"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


IMAGE_REF = re.compile(r"(?P<name>[a-z0-9][a-z0-9./_-]*)(:(?P<tag>[\w][\w.-]*))?(@sha256:(?P<digest>[0-9a-f]{64}))?")


def image_problem(image: str) -> str | None:
    """Why ``image`` is not pinned (None if it is): a digest, or an explicit tag other than latest."""
    match = IMAGE_REF.fullmatch(image)
    if match is None:
        return f"{image!r} is not an image reference"
    if match["tag"] == "latest":
        return f"{image!r} uses the mutable tag latest"
    if match["tag"] is None and match["digest"] is None:
        return f"{image!r} has neither a tag nor a digest (means latest)"
    return None


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


def test_every_node_type_names_the_restricted_security_group(cluster):
    """Without SecurityGroupIds the launcher makes a group with SSH open to 0.0.0.0/0."""
    groups = {tuple(t["node_config"].get("SecurityGroupIds", [])) for t in cluster["available_node_types"].values()}
    assert groups == {("sg-0123456789abcdef0",)}, groups
    prepared = prepare_config(copy.deepcopy(cluster))
    assert all(t["node_config"]["SecurityGroupIds"] == ["sg-0123456789abcdef0"]
               for t in prepared["available_node_types"].values())
    text = re.sub(r"\\\n\s*", " ", CLUSTER_DOC.read_text())
    ssh_rules = [line for line in text.splitlines() if "authorize-security-group-ingress" in line and "--port 22" in line]
    assert ssh_rules and all("--cidr $SSH_CIDR" in line for line in ssh_rules), ssh_rules
    assert "0.0.0.0/0" not in text.split("### A3.")[1].split("### A4.")[0]
    assert "sg-0123456789abcdef0/$SG" in text  # the placeholder is replaced in A4


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
    assert len(froms) == 1 and image_problem(froms[0]) is None, froms
    # A digest may follow the tag (docs/CLUSTER.md "Pin the images").
    assert froms[0].split("@")[0] == f"rayproject/ray:{pinned_ray_version()}-py311-gpu"
    assert pinned_ray_version() == ray.__version__ == "2.60.0"


def test_dockerfile_installs_the_project_without_dev_extras():
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    installs = [shlex.split(args) for args in runs if "pip install" in args]
    assert any("." in words[words.index("install") + 1 :] for words in installs), installs
    assert "[dev]" not in DOCKERFILE.read_text()
    # Everything installed beside the project is pinned to one version (issue 23, finding 6).
    extras = [w for words in installs for w in words[words.index("install") + 1 :] if w != "." and not w.startswith("-")]
    assert extras and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", w) for w in extras), extras


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


def pod_templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of the RayJob: head, worker groups and the job submitter."""
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster_spec["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster_spec["workerGroupSpecs"]})
    templates["submitter"] = rayjob["spec"]["submitterPodTemplate"]
    return templates


AWS_KEY_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def test_rayjob_pods_hold_no_aws_keys_and_reach_s3_through_their_service_accounts(rayjob):
    accounts = {doc["metadata"]["name"]: doc for doc in load_yaml_documents(SERVICE_ACCOUNTS_YAML)
                if doc["kind"] == "ServiceAccount"}
    for name, template in pod_templates(rayjob).items():
        for container in pod_containers(template):
            assert not container.get("envFrom"), f"{name}/{container['name']}: envFrom (a Secret of keys?)"
            assert not {e["name"] for e in container.get("env", [])} & AWS_KEY_VARIABLES, f"{name}/{container['name']}"
        if name == "submitter":
            assert template["spec"]["automountServiceAccountToken"] is False
            continue
        account = template["spec"].get("serviceAccountName")
        assert account in accounts, f"{name}: serviceAccountName {account!r} is not in deploy/serviceaccounts.yaml"
        assert accounts[account]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    head_account = pod_templates(rayjob)["head"]["spec"]["serviceAccountName"]
    # KubeRay binds its autoscaler Role to the head's account; Ray tasks on workers get none of it.
    assert all(t["spec"]["serviceAccountName"] != head_account
               for n, t in pod_templates(rayjob).items() if n not in ("head", "submitter"))
    for path in (RAYJOB_YAML, SERVICE_ACCOUNTS_YAML, NETWORK_POLICY_YAML, CLUSTER_YAML):
        assert not AWS_KEY_VARIABLES & set(re.findall(r"AWS_[A-Z_]+", path.read_text())), path


def test_every_rayjob_pod_runs_non_root_without_privileges(rayjob):
    for name, template in pod_templates(rayjob).items():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000, name  # the image's user "ray"
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod_containers(template):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, f"{name}/{container['name']}"
            assert context["capabilities"] == {"drop": ["ALL"]}, f"{name}/{container['name']}"
            assert not context.get("privileged") and context.get("runAsUser", 1000) != 0
        for init in template["spec"].get("initContainers", []):
            assert init["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}/{init['name']}"
    autoscaler = rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"] == {"drop": ["ALL"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_network_policies_cover_every_rayjob_pod_and_admit_only_named_peers(rayjob):
    policies = [doc for doc in load_yaml_documents(NETWORK_POLICY_YAML) if doc["kind"] == "NetworkPolicy"]
    assert policies and all(doc["apiVersion"] == "networking.k8s.io/v1" for doc in policies)
    for name, template in pod_templates(rayjob).items():
        labels = template["metadata"]["labels"]
        covering = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert covering, f"{name}: no NetworkPolicy selects its labels {labels}"
        for policy in covering:
            assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, policy["metadata"]["name"]
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']}: an ingress rule without 'from' admits everyone"
            assert all("ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels") for peer in peers)
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and block["cidr"] == "0.0.0.0/0":
                    assert "169.254.169.254/32" in block.get("except", []), "egress must not reach the EC2 metadata service"
                    assert {port["port"] for port in rule["ports"]} == {443}, rule


def test_rayjob_runs_from_the_images_copy_of_the_repository(rayjob):
    working_dir = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"]
    workdirs = [args for instruction, args in dockerfile_instructions() if instruction == "WORKDIR"]
    assert workdirs[-1] == working_dir


def test_one_image_everywhere(cluster, rayjob):
    image = cluster["docker"]["image"]
    # The project's version as the tag, optionally with a digest (docs/CLUSTER.md "Pin the images").
    assert image.split("@")[0].endswith(f"/spin-ray:{project_version()}"), image
    templates = pod_templates(rayjob).values()
    assert {c["image"] for t in templates for c in t["spec"]["containers"]} == {image}
    assert f"docker build -f docker/Dockerfile -t {image.split('@')[0]} ." in DOCKERFILE.read_text()


def test_no_image_is_latest_or_unpinned(cluster, rayjob):
    images = [cluster["docker"]["image"]]
    images += [c["image"] for t in pod_templates(rayjob).values() for c in pod_containers(t)]
    images += [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    problems = [problem for problem in map(image_problem, images) if problem]
    assert not problems, problems
    for path in (CLUSTER_YAML, RAYJOB_YAML, DOCKERFILE, CLUSTER_DOC):
        assert not re.search(r"[\w./-]+:latest\b", path.read_text()), f"{path.name} names a :latest image"


@pytest.mark.parametrize("image, pinned", [
    ("amazon/aws-cli:latest", False), ("amazon/aws-cli", False), ("amazon/aws-cli:2.34.48", True),
    ("rayproject/ray:2.60.0-py311-gpu@sha256:" + "a" * 64, True), ("amazon/aws-cli@sha256:" + "0" * 64, True),
    ("123456789012.dkr.ecr.us-west-2.amazonaws.com/spin-ray:latest", False),
])
def test_the_image_check_flags_latest_and_missing_tags(image, pinned):
    assert (image_problem(image) is None) is pinned


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


def doc_json_heredocs() -> dict[str, Any]:
    """The JSON files docs/CLUSTER.md writes with ``cat > NAME.json <<EOF`` (shell variables left in)."""
    text = CLUSTER_DOC.read_text()
    blocks = re.findall(r"cat > ([\w-]+\.json) <<'?EOF'?\n(.*?)\nEOF\n", text, flags=re.S)
    return {name: json.loads(body) for name, body in blocks}


def statements_allowing(policy: dict[str, Any], action: str) -> list[dict[str, Any]]:
    def actions(statement: dict[str, Any]) -> list[str]:
        return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
    return [st for st in policy["Statement"] if st["Effect"] == "Allow"
            and any(a == action or (a.endswith("*") and action.startswith(a[:-1])) for a in actions(st))]


def resources(statement: dict[str, Any]) -> list[str]:
    return [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]


def test_docs_iam_policies_follow_least_privilege():
    policies = doc_json_heredocs()
    assert {"s3-bucket.json", "head-autoscaler.json", "ec2-trust.json", "pods-trust.json"} <= set(policies)
    bucket = policies["s3-bucket.json"]
    for action in ("s3:PutObject", "s3:DeleteObject"):
        written = [r for st in statements_allowing(bucket, action) for r in resources(st)]
        assert written == ["arn:aws:s3:::$BUCKET/runs/*"], (action, written)
    read = {r for st in statements_allowing(bucket, "s3:GetObject") for r in resources(st)}
    assert "arn:aws:s3:::$BUCKET/spin-ray-assets/*" in read and "arn:aws:s3:::$BUCKET/*" not in read
    head = policies["head-autoscaler.json"]
    granted = {a for st in head["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert not any(a.endswith("*") for a in granted), granted
    assert {a.split(":")[0] for a in granted} == {"ec2", "iam"} and "iam:PassRole" in granted
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        for statement in statements_allowing(head, action):
            assert statement["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "spin-ray"}}
    assert "AmazonEC2FullAccess" not in CLUSTER_DOC.read_text().replace("No `AmazonEC2FullAccess`", "")
    assert "put-bucket-versioning --bucket $BUCKET --versioning-configuration Status=Enabled" in CLUSTER_DOC.read_text()

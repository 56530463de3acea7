"""Security defaults, checked on the source: every way weights enter or leave the program.

The checker parses every ``.py`` file under spin_ray/, jobs/ and bench/ with ``ast`` and
reports any loading path other than the safe ones:

- ``torch.load`` only with ``weights_only=True``; no ``weights_only=False`` anywhere;
- no pickle, dill, joblib, cloudpickle (``ray.cloudpickle`` too), marshal or shelve imports,
  no ``torch.jit.load``, no ``torch.hub`` (it runs a repository's ``hubconf.py`` or unpickles a
  download), no ``read_pickle``, no ``np.load(allow_pickle=...)`` other than ``False``, no YAML
  loader but ``yaml.safe_load``; ``torch.serialization.load`` is held to ``torch.load``'s rule;
- no ``Tuner.restore`` / ``Trainer.restore`` (they unpickle the experiment state in storage)
  but the one on :data:`ALLOWED`; no ``eval`` or ``exec``; no ``shell=`` other than ``False``;
- no ``trust_remote_code`` other than ``False``;
- ``from_pretrained`` and a pipeline's ``download`` pass ``use_safetensors=True`` unless the
  class reads only config and vocabulary files (tokenizers, processors, schedulers, configs),
  or the call is on :data:`ALLOWED` with its reason; open_clip builds models with
  ``pretrained=None`` (published reward weights go through ``torch.load(weights_only=True)``);
- ``save_pretrained`` passes ``safe_serialization=True``; ``torch.save`` only on :data:`ALLOWED`;
- no ``os.system`` / ``os.popen`` / ``subprocess.getoutput`` (they run a shell command line).

Names are resolved through the module's imports before the rules apply, so an alias does
not hide a call: ``import yaml as y; y.load(...)``, ``from yaml import unsafe_load``,
``from ray.tune import Tuner as T; T.restore(...)``, ``import torch.serialization as ts;
ts.load(...)``, ``from builtins import eval as e`` and ``import ray; ray.cloudpickle.loads(...)``
are all caught. docs/SECURITY.md lists these rules.

The checker is tested on planted violations, so a rule that stopped matching would show.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("spin_ray", "jobs", "bench")

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
CONFIG_ONLY_CLASS = re.compile(r"(Tokenizer(Fast)?|Processor|FeatureExtractor|Scheduler|Config)$")
"""Classes whose ``from_pretrained`` reads JSON and vocabulary files only, never tensors."""


@dataclass(frozen=True)
class Allowed:
    """A call the rules would flag that is accepted, with the reason."""

    path: str
    function: str
    call: str
    reason: str


ALLOWED = (
    Allowed("spin_ray/rewards/pickscore.py", "load_pickscore", "CLIPModel.from_pretrained",
            "published reward model (PickScore_v1) whose hub folder may hold only pytorch_model.bin; "
            "transformers 5 takes model.safetensors when present and reads .bin only with "
            "torch.load(weights_only=True)"),
    Allowed("spin_ray/rewards/aesthetic.py", "load_aesthetic", "CLIPModel.from_pretrained",
            "published CLIP ViT-L/14 folder; same transformers 5 rule as PickScore"),
    Allowed("spin_ray/tiny.py", "build_clip_tokenizer", "tokenizer.save_pretrained",
            "a tokenizer writes vocabulary and JSON files only, no tensors"),
    Allowed("spin_ray/train_loop.py", "save_checkpoint", "torch.save",
            "AdamW and LR-schedule state (not model weights), read back with torch.load(weights_only=True)"),
    Allowed("spin_ray/sweep/tuner.py", "run_tuner", "tune.Tuner.restore",
            "resumes the sweep's own Tune experiment only with --resume (sweep.resume.may_restore), "
            "which trusts the run directory (docs/SECURITY.md)"),
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    function: str
    call: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function}(): {self.call}: {self.problem}"


def dotted_name(node: ast.AST) -> str:
    """``torch.jit.load`` for the call target ``torch.jit.load``; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    if isinstance(node, ast.Call):  # e.g. get_model().save_pretrained: keep the method
        return dotted_name(node.func)
    return ""


def keyword_value(call: ast.Call, name: str) -> tuple[bool, object]:
    """Whether ``name=`` is passed, and its value when it is a constant (else the node)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            value = keyword.value
            return True, value.value if isinstance(value, ast.Constant) else value
    return False, None


def passes_true(call: ast.Call, name: str) -> bool:
    present, value = keyword_value(call, name)
    return present and value is True


class Checker(ast.NodeVisitor):
    """Collects :class:`Finding` objects for one module."""

    def __init__(self, path: str):
        self.path = path
        self.function = "<module>"
        self.imported: dict[str, str] = {}
        """Local name -> the dotted name it was imported as (``y`` -> ``yaml``, ``T`` -> ``ray.tune.Tuner``)."""
        self.findings: list[Finding] = []

    def flag(self, node: ast.AST, call: str, problem: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, self.function, call, problem))

    def resolve(self, name: str) -> str:
        """``name`` with its first part replaced by what the module imported under it."""
        head, _, rest = name.partition(".")
        origin = self.imported.get(head)
        return name if origin is None else f"{origin}.{rest}" if rest else origin

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if UNSAFE_MODULES & set(alias.name.split(".")):  # ray.cloudpickle as well as pickle
                self.flag(node, f"import {alias.name}", "unsafe deserialisation module")
            # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to ``a.b``
            local = alias.asname or alias.name.split(".")[0]
            self.imported[local] = alias.name if alias.asname else local
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        # ``from ray import cloudpickle`` as well as ``from pickle import loads``
        if UNSAFE_MODULES & {*module.split("."), *(alias.name for alias in node.names)}:
            self.flag(node, f"from {module} import ...", "unsafe deserialisation module")
        if module == "yaml" and any(a.name in UNSAFE_YAML | UNSAFE_YAML_LOADERS for a in node.names):
            self.flag(node, f"from {module} import ...", "yaml loaders other than safe_load build arbitrary objects")
        if not node.level:  # relative imports name this project's modules
            for alias in node.names:
                self.imported[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # ``import ray`` then ``ray.cloudpickle.loads``: no import statement names the module
        name = dotted_name(node)
        if name.split(".")[0] in self.imported and UNSAFE_MODULES & set(self.resolve(name).split(".")):
            self.flag(node, name, "unsafe deserialisation module")
            return  # the inner attributes name the same module
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = dotted_name(node.func)
        self.check_keywords(node, name)
        self.check_call(node, name, self.resolve(name).split("."))
        self.generic_visit(node)

    def check_call(self, node: ast.Call, name: str, parts: list[str]) -> None:
        """The rules on one call; ``parts`` is its resolved dotted name, ``name`` as written."""
        receiver = parts[-2] if len(parts) > 1 else ""
        is_torch = parts[0] == "torch"
        if is_torch and parts[1:] in (["load"], ["serialization", "load"]):
            if not passes_true(node, "weights_only"):
                self.flag(node, name, "torch.load without weights_only=True")
        elif is_torch and parts[1:] == ["jit", "load"]:
            self.flag(node, name, "torch.jit.load runs pickled code")
        elif is_torch and parts[1:2] == ["hub"]:
            self.flag(node, name, "torch.hub runs a repository's hubconf.py or unpickles a download")
        elif is_torch and parts[1:] == ["save"]:
            self.flag(node, name, "torch.save writes pickle: model weights go to safetensors")
        elif parts[-1] == "read_pickle":
            self.flag(node, name, "read_pickle unpickles data")
        elif parts[-1] == "restore" and (receiver == "Tuner" or receiver.endswith("Trainer")):
            self.flag(node, name, "restore unpickles the experiment state found in storage")
        elif parts in (["eval"], ["exec"], ["builtins", "eval"], ["builtins", "exec"]):  # not model.eval()
            self.flag(node, name, "eval/exec run strings as code")
        elif ".".join(parts) in SHELL_CALLS:
            self.flag(node, name, "runs a shell command line: use subprocess with a list and shell=False")
        elif parts[0] == "yaml" and parts[1:] and parts[-1] in UNSAFE_YAML:
            self.flag(node, name, "yaml loaders other than safe_load build arbitrary objects")
        elif parts[0] == "open_clip" and parts[-1].startswith("create_model"):
            present, value = keyword_value(node, "pretrained")
            if present and value is not None:
                self.flag(node, name, "open_clip pretrained= loads weights its own way: pass pretrained=None "
                                      "and read the weights with torch.load(weights_only=True)")
        elif parts[-1] == "from_pretrained" and not CONFIG_ONLY_CLASS.search(receiver):
            if not passes_true(node, "use_safetensors"):
                self.flag(node, name, "from_pretrained without use_safetensors=True")
        elif parts[-1] == "download" and receiver.endswith("Pipeline") and not passes_true(node, "use_safetensors"):
            self.flag(node, name, "download without use_safetensors=True")
        elif parts[-1] == "save_pretrained" and not passes_true(node, "safe_serialization"):
            self.flag(node, name, "save_pretrained without safe_serialization=True")

    def check_keywords(self, node: ast.Call, name: str) -> None:
        for keyword, safe in [("weights_only", True), ("trust_remote_code", False), ("allow_pickle", False),
                              ("use_safetensors", True), ("safe_serialization", True), ("shell", False)]:
            present, value = keyword_value(node, keyword)
            if present and value is not safe:
                self.flag(node, name, f"{keyword} must be {safe} (a literal), got {ast.unparse(node)}")


def scan_file(path: Path, rel: str) -> list[Finding]:
    """Every finding in one source file (``rel`` is its path as reported)."""
    checker = Checker(rel)
    checker.visit(ast.parse(path.read_text(), filename=str(path)))
    return checker.findings


def is_allowed(finding: Finding) -> bool:
    return any((a.path, a.function, a.call) == (finding.path, finding.function, finding.call) for a in ALLOWED)


def source_files() -> list[Path]:
    return sorted(p for folder in SCANNED_DIRS for p in (REPO / folder).rglob("*.py"))


# ----------------------------------------------------------------------------- the project


def test_the_source_has_only_safe_loading_paths():
    files = source_files()
    assert len(files) > 20 and any(p.name == "trainer.py" for p in files)
    findings = [f for p in files for f in scan_file(p, p.relative_to(REPO).as_posix())]
    problems = [str(f) for f in findings if not is_allowed(f)]
    assert not problems, "unsafe loading paths:\n" + "\n".join(problems)


def test_every_allow_list_entry_is_still_needed():
    """A stale entry would silently allow a future call of the same name."""
    findings = [f for p in source_files() for f in scan_file(p, p.relative_to(REPO).as_posix())]
    for entry in ALLOWED:
        assert entry.reason
        assert any(is_allowed(f) and (f.path, f.function, f.call) == (entry.path, entry.function, entry.call)
                   for f in findings), f"allow-list entry no longer matches any call: {entry}"


# ----------------------------------------------------------------------------- the checker itself


PLANTED = {
    "import pickle": "unsafe deserialisation module",
    "from joblib import load": "unsafe deserialisation module",
    "import dill as d": "unsafe deserialisation module",
    "torch.load(path)": "torch.load without weights_only=True",
    "torch.load(path, weights_only=False)": "weights_only must be True",
    "th.load(path, map_location='cpu')": "torch.load without weights_only=True",
    "load(path)": "torch.load without weights_only=True",
    "torch.load(path, weights_only=flag)": "torch.load without weights_only=True",
    "torch.jit.load(path)": "torch.jit.load runs pickled code",
    "torch.save(model.state_dict(), path)": "torch.save writes pickle",
    "np.load(path, allow_pickle=True)": "allow_pickle must be False",
    "pd.read_pickle(path)": "read_pickle unpickles data",
    "AutoModel.from_pretrained(path, trust_remote_code=True)": "trust_remote_code must be False",
    "AutoTokenizer.from_pretrained(path, trust_remote_code=True)": "trust_remote_code must be False",
    "UNet2DConditionModel.from_pretrained(path)": "from_pretrained without use_safetensors=True",
    "CLIPModel.from_pretrained(path, use_safetensors=False)": "use_safetensors must be True",
    "pipe.save_pretrained(out)": "save_pretrained without safe_serialization=True",
    "pipe.save_pretrained(out, safe_serialization=False)": "safe_serialization must be True",
    "torch.hub.load('someone/repo', 'model')": "torch.hub runs",
    "torch.hub.load_state_dict_from_url(path)": "torch.hub runs",
    "yaml.load(path, Loader=yaml.Loader)": "yaml loaders other than safe_load",
    "yaml.unsafe_load(path)": "yaml loaders other than safe_load",
    "open_clip.create_model_and_transforms('ViT-H-14', pretrained=path)": "open_clip pretrained=",
    "open_clip.create_model('ViT-H-14', pretrained='laion2b_s32b_b79k')": "open_clip pretrained=",
    "StableDiffusionPipeline.download(path)": "download without use_safetensors=True",
    "import ray.cloudpickle": "unsafe deserialisation module",
    "from ray import cloudpickle": "unsafe deserialisation module",
    "from ray.cloudpickle import loads": "unsafe deserialisation module",
    "import marshal": "unsafe deserialisation module",
    "torch.serialization.load(path)": "torch.load without weights_only=True",
    "tune.Tuner.restore(path, trainable)": "restore unpickles the experiment state",
    "TorchTrainer.restore(path)": "restore unpickles the experiment state",
    "eval(path)": "eval/exec run strings as code",
    "exec(path)": "eval/exec run strings as code",
    "subprocess.run(path, shell=True)": "shell must be False",
}


def planted_module(tmp_path: Path, statement: str) -> Path:
    path = tmp_path / "planted.py"
    path.write_text(textwrap.dedent(f"""\
        import numpy as np
        import pandas as pd
        import torch
        import torch as th
        from torch import load


        def loader(path, out, model, pipe, flag):
            {statement}
        """))
    return path


@pytest.mark.parametrize("statement", sorted(PLANTED))
def test_checker_catches_a_planted_violation(tmp_path, statement):
    findings = scan_file(planted_module(tmp_path, statement), "planted.py")
    assert findings, f"not caught: {statement}"
    assert any(PLANTED[statement] in f.problem for f in findings), [str(f) for f in findings]
    assert all(f.function == "loader" and f.line == 9 for f in findings)


SAFE = [
    "torch.load(path, map_location='cpu', weights_only=True)",
    "np.load(path)",
    "np.load(path, allow_pickle=False)",
    "UNet2DConditionModel.from_pretrained(path, subfolder='unet', use_safetensors=True)",
    "CLIPTokenizer.from_pretrained(path)",
    "CLIPProcessor.from_pretrained(path)",
    "DDIMScheduler.from_pretrained(path, subfolder='scheduler')",
    "AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
    "pipe.save_pretrained(out, safe_serialization=True)",
    "yaml.safe_load(path)",
    "open_clip.create_model('ViT-H-14', pretrained=None, device='cpu')",
    "open_clip.create_model('ViT-H-14')",
    "StableDiffusionPipeline.download(path, use_safetensors=True, safety_checker=None)",
    "torch.serialization.load(path, weights_only=True)",
    "model.eval()",
    "tune.Tuner.can_restore(path)",
    "subprocess.run([path], shell=False)",
]


@pytest.mark.parametrize("statement", SAFE)
def test_checker_passes_the_safe_forms(tmp_path, statement):
    assert scan_file(planted_module(tmp_path, statement), "planted.py") == []


def test_allow_list_matches_file_function_and_call(tmp_path):
    path = planted_module(tmp_path, "torch.save(model.state_dict(), path)")
    (finding,) = scan_file(path, "spin_ray/train_loop.py")
    assert not is_allowed(finding), "torch.save outside save_checkpoint must not be allowed"
    assert is_allowed(Finding("spin_ray/train_loop.py", 1, "save_checkpoint", "torch.save", ""))


ALIASED = {
    "import yaml as y\ny.load(text)": "yaml loaders other than safe_load",
    "import yaml\nyaml.load(text, Loader=yaml.UnsafeLoader)": "yaml loaders other than safe_load",
    "from yaml import load\nload(text)": "yaml loaders other than safe_load",
    "from yaml import unsafe_load as parse\nparse(text)": "yaml loaders other than safe_load",
    "from yaml import UnsafeLoader": "yaml loaders other than safe_load",
    "import ray\nray.cloudpickle.loads(blob)": "unsafe deserialisation module",
    "import ray.cloudpickle as cp": "unsafe deserialisation module",
    "import marshal as m\nm.loads(blob)": "unsafe deserialisation module",
    "from marshal import loads as parse\nparse(blob)": "unsafe deserialisation module",
    "from ray.tune import Tuner as T\nT.restore(path, trainable)": "restore unpickles the experiment state",
    "from ray import tune as t\nt.Tuner.restore(path, trainable)": "restore unpickles the experiment state",
    "import torch.serialization as ts\nts.load(path)": "torch.load without weights_only=True",
    "from torch import serialization\nserialization.load(path)": "torch.load without weights_only=True",
    "from torch.serialization import load as fetch\nfetch(path)": "torch.load without weights_only=True",
    "from builtins import eval as evaluate\nevaluate(text)": "eval/exec run strings as code",
    "import builtins\nbuiltins.exec(text)": "eval/exec run strings as code",
    "import subprocess as sp\nsp.Popen(text, shell=True)": "shell must be False",
    "import os\nos.system(text)": "runs a shell command line",
    "from os import popen\npopen(text)": "runs a shell command line",
}
"""Hostile snippets that reach an unsafe call through an import alias (issue 23, finding 9)."""

ALIASED_SAFE = [
    "import yaml as y\ny.safe_load(text)",
    "import torch as th\nth.load(path, weights_only=True)",
    "from ray.tune import Tuner\nTuner.can_restore(path)",
    "import subprocess as sp\nsp.run([text], check=True)",
    "import ray\nray.get(blob)",
]


def aliased_module(tmp_path: Path, snippet: str) -> Path:
    path = tmp_path / "aliased.py"
    path.write_text(snippet + "\n")
    return path


@pytest.mark.parametrize("snippet", sorted(ALIASED))
def test_checker_sees_through_import_aliases(tmp_path, snippet):
    findings = scan_file(aliased_module(tmp_path, snippet), "aliased.py")
    assert any(ALIASED[snippet] in f.problem for f in findings), (snippet, [str(f) for f in findings])


@pytest.mark.parametrize("snippet", ALIASED_SAFE)
def test_checker_passes_safe_calls_through_aliases(tmp_path, snippet):
    assert scan_file(aliased_module(tmp_path, snippet), "aliased.py") == []

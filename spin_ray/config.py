"""Typed, frozen configuration tree for spin-ray.

Every YAML key is spelled exactly like the dataclass field it fills, and every field is
passed under that name to the code it configures, so ``grep`` leads from a config key to
the code that uses it. Load with :func:`load_config`; override with ``key=value`` pairs
whose keys are dotted paths (``loss.beta=[2000,5000]``, ``train.lr=1e-5``).

Per-iteration hyperparameters (``loss.beta``, ``train.lr``, ``train.steps``) accept a
scalar (the same value every iteration) or a list with one value per self-play iteration;
read them with :func:`per_iteration`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from spin_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and the problem."""

    label = "config error"


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion model that self-play starts from (theta_0)."""

    pretrained: str = "toy"
    """Local diffusers directory, hub id (e.g. ``runwayml/stable-diffusion-v1-5``), or
    ``toy`` for the embedded toy base model (built and cached on first use)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    local_files_only: bool = False
    """Never contact a model hub; fail if the files are not on disk."""
    resolution: int = 512
    """Image side in pixels; latents are resolution / 8 per side."""


@dataclass(frozen=True)
class DataConfig:
    """The SFT dataset of (prompt, image) pairs: the "real" side of the SPIN loss."""

    path: str = ""
    """A parquet file, a directory of parquet files, a glob, or an image folder; local or
    ``s3://``/``gs://``. Empty with ``model.pretrained: toy`` means the embedded toy world."""
    format: Literal["pickapic", "parquet", "folder"] = "pickapic"
    """``pickapic``: Pick-a-Pic v2 schema (winner of jpg_0/jpg_1 by label_0); ``parquet``:
    one image column and one caption column; ``folder``: images plus metadata.jsonl/csv."""
    prompt_column: str = "caption"
    """Caption column (``parquet``) or metadata field (``folder``)."""
    image_column: str = "image"
    """Image-bytes column (``parquet``); for ``folder``, the metadata field with the file name
    when the metadata has no ``file_name`` (the Hugging Face imagefolder convention)."""
    max_rows: int | None = None
    """Use at most this many rows (after dropping ties and bad rows); None: all."""
    on_bad_row: Literal["skip", "fail"] = "fail"
    """``fail``: stop at the first bad row with its file, row and field; ``skip``: drop and
    count it, and stop only when more than ``max_bad_fraction`` of rows are bad."""
    max_bad_fraction: float = 0.01
    """With ``on_bad_row: skip``, the largest tolerated share of bad rows."""
    prepare_batch_size: int = 16
    """Rows per batch in the VAE/text-encoder preparation stage (per actor)."""
    prepare_num_actors: int = 1
    """Actors in the preparation stage, each holding the frozen VAE and text encoder."""
    prepare_gpus_per_actor: float = 0.0
    """GPUs per preparation actor (0 on CPU)."""
    max_image_bytes: int = 64 << 20
    """Largest encoded image in bytes (a parquet cell or a folder's file); larger is a bad row,
    a folder file is not read (docs/SECURITY.md)."""
    max_row_group_bytes: int = 1 << 30
    """Largest uncompressed size of one parquet row group's read columns, as the footer declares
    and as decoded (a decompression bomb cap); larger: its rows are ``unreadable_file``."""


@dataclass(frozen=True)
class GenerationConfig:
    """How the frozen opponent theta_k samples its (synthetic) images."""

    num_inference_steps: int = 50
    """DDIM steps per opponent sample."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1.0 disables guidance)."""
    eta: float = 0.0
    """DDIM eta (0: deterministic DDIM)."""
    batch_size: int = 8
    """Rows per generation batch (per actor)."""
    num_actors: int = 1
    """Generation actors, each holding one copy of theta_k."""
    gpus_per_actor: float = 0.0
    """GPUs per generation actor (0 on CPU)."""
    compile: bool = False
    """``torch.compile`` each actor's opponent UNet. On GPU it fuses the elementwise ops between
    convolutions; each actor's first batches (and a smaller last batch) pay the compile time.
    The rest of the fast path (bf16 on GPU, SDPA attention, channels_last on CUDA) is always on;
    see docs/PERFORMANCE.md."""


@dataclass(frozen=True)
class LossConfig:
    """The training objective; see :mod:`spin_ray.loss` and docs/DESIGN.md section 4."""

    type: Literal["spin", "sft"] = "spin"
    """``spin``: self-play loss against theta_k; ``sft``: plain denoising loss on real images."""
    beta: float | list[float] = 2000.0
    """KL strength beta_t (Diffusion-DPO convention); scalar or one value per iteration."""
    reference: Literal["precomputed", "online"] = "precomputed"
    """``precomputed``: the generation actors compute theta_k's errors and ship them with the
    pairs; ``online``: the trainer holds a frozen copy of theta_k and computes them."""
    shared_noise: bool = True
    """Use the same noise for the real and the synthetic branch (common random numbers)."""
    timestep_weighting: Literal["none", "h2"] = "none"
    """``h2``: weight each sample by the paper's h_t^2 (eq. C.5); ``none``: fold it into beta."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of theta on (real, synthetic) pairs."""

    lr: float | list[float] = 2e-5
    """Peak AdamW learning rate; scalar or one value per iteration."""
    steps: int | list[int] = 50
    """Optimizer steps per iteration; scalar or one value per iteration."""
    batch_size: int = 8
    """Pairs per micro-batch, per training worker."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    warmup_steps: int = 200
    """Linear warm-up steps; the learning rate then decays linearly to 0 (per iteration)."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """After warm-up: ``linear`` decay to 0 at the last step, or ``constant``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel, one model replica each)."""
    use_gpu: bool = False
    """One GPU per training worker."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass to save memory."""
    compile: bool = False
    """``torch.compile`` theta (and theta_k with ``loss.reference: online``) in each training
    worker; pays a compile at the first steps. With several workers the in-place compile
    does not overlap DDP's gradient all-reduce with the backward pass."""
    checkpoint_every: int = 0
    """Write a Train checkpoint every N optimizer steps (0: only at the end)."""
    log_every: int = 10
    """Report metrics every N optimizer steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may make (from the last checkpoint) before giving up."""


@dataclass(frozen=True)
class SelfPlayConfig:
    """The outer loop: theta_{k+1} is trained against theta_k."""

    iterations: int = 3
    """Number of self-play iterations K."""
    sft_baseline: bool = False
    """Also train an SFT model from theta_0 on the same data and as many samples as all the
    iterations together (their steps summed; iteration 1's learning rate), for comparison."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of every model once the iterations are done (and by ``jobs/evaluate.py``)."""

    enabled: bool = False
    """Evaluate theta_0, each theta_k (and the SFT baseline) after the last iteration."""
    prompts: str | list[str] = ""
    """Prompt set(s): a text file (one prompt a line), PartiPrompts.tsv, Pick-a-Pic parquet (a
    split file or dir), an HPSv2 benchmark dir, or ``toy`` (the toy world's held-out prompts)."""
    max_prompts: int | None = None
    """Evaluate at most this many prompts per prompt set."""
    max_prompt_file_bytes: int = 64 << 20
    """Largest prompt file read, in bytes (for parquet: its caption column uncompressed);
    checked before reading (docs/SECURITY.md)."""
    models: dict[str, str] = field(default_factory=dict)
    """``jobs/evaluate.py``: models to compare, name -> diffusers dir or hub id."""
    baseline: str = "base"
    """The model that win rates are computed against."""
    scorers: list[str] = field(default_factory=lambda: ["pickscore", "hpsv2", "imagereward", "aesthetic"])
    """Scorer names for :func:`spin_ray.rewards.load_scorer`."""
    scorer_paths: dict[str, str] = field(default_factory=dict)
    """Local weight path per scorer name (the scorer's file or its directory layout)."""
    scorer_options: dict[str, dict[str, str | int | float | bool]] = field(default_factory=dict)
    """Extra keyword arguments per scorer, e.g. ``aesthetic: {clip_path: ..., head_path: ...}``."""
    normalise_average: bool = False
    """Best-of-N by the mean of z-scored metrics instead of the paper's plain average."""
    num_images_per_prompt: int = 5
    """N in best-of-N."""
    guidance_scale: float = 7.5
    """Guidance when generating evaluation images."""
    num_inference_steps: int = 50
    """DDIM steps when generating evaluation images."""
    seed: int = 0
    """Seed of the evaluation images (the same for every model)."""
    batch_size: int = 8
    """Images per generation/scoring batch."""
    num_actors: int = 1
    """Generation actors (and scorer actors) in the evaluation pipeline."""
    gpus_per_actor: float = 0.0
    """GPUs per evaluation generation actor and per scorer actor (0 on CPU)."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where Ray runs and how resources are placed."""

    address: str | None = None
    """Ray address; None: join the running cluster if there is one (``RAY_ADDRESS`` or
    ``ray job submit``), else start a local instance; ``local``: always a private local instance."""
    generation_node_label: str | None = None
    """Custom resource a node type offers to host generation actors (e.g. ``gen_node``)."""
    train_node_label: str | None = None
    """Custom resource a node type offers to host training workers (e.g. ``train_node``)."""


@dataclass(frozen=True)
class Config:
    """The whole run."""

    run_dir: str = "runs/default"
    """Run directory (local path or ``s3://``/``gs://`` URI); reruns resume from it."""
    seed: int = 0
    """Seed of everything: opponent noise, timesteps, data order, initialisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    self_play: SelfPlayConfig = field(default_factory=SelfPlayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


PER_ITERATION_KEYS = ("loss.beta", "train.lr", "train.steps")


def per_iteration(value: Any, iteration: int) -> Any:
    """The value of a per-iteration field for 1-based ``iteration`` (scalar or list)."""
    if isinstance(value, list):
        return value[iteration - 1]
    return value


# ----------------------------------------------------------------------------- building


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    types_by_name = _field_types(cls)
    for name in values:
        if name not in types_by_name:
            raise ConfigError(_unknown_key_message(name, list(types_by_name), prefix))
    kwargs = {name: _coerce(v, types_by_name[name], _join(prefix, name)) for name, v in values.items()}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_message(name: str, known: list[str], prefix: str) -> str:
    message = f"unknown config key {_join(prefix, name)!r}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        message += f"; did you mean {_join(prefix, close[0])!r}?"
    else:
        message += f"; valid keys here: {', '.join(sorted(known))}"
    return message


def _validate(cfg: Config) -> Config:
    k = cfg.self_play.iterations
    if k < 1:
        raise ConfigError(f"self_play.iterations: must be >= 1, got {k}")
    for key in PER_ITERATION_KEYS:
        value = get_by_path(cfg, key)
        if isinstance(value, list) and len(value) != k:
            raise ConfigError(
                f"{key}: has {len(value)} values but self_play.iterations is {k}; "
                "give one value per iteration or a single scalar"
            )
        for v in value if isinstance(value, list) else [value]:
            if v <= 0:
                raise ConfigError(f"{key}: must be positive, got {v}")
    positive = [
        "model.resolution", "generation.num_inference_steps", "generation.batch_size",
        "generation.num_actors", "train.batch_size", "train.gradient_accumulation_steps",
        "train.num_workers", "train.log_every", "data.prepare_batch_size",
        "data.prepare_num_actors", "eval.num_images_per_prompt", "eval.batch_size",
        "eval.num_inference_steps", "train.max_nonfinite_steps", "eval.num_actors",
        "data.max_image_bytes", "data.max_row_group_bytes", "eval.max_prompt_file_bytes",
    ]
    for key in positive:
        if get_by_path(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get_by_path(cfg, key)}")
    if cfg.model.resolution % 8:
        raise ConfigError(f"model.resolution: must be a multiple of 8, got {cfg.model.resolution}")
    for key in ["train.warmup_steps", "train.checkpoint_every", "train.max_grad_norm",
                "generation.gpus_per_actor", "data.prepare_gpus_per_actor", "generation.eta",
                "train.max_failures"]:
        if get_by_path(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_by_path(cfg, key)}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.generation.guidance_scale < 1.0:
        raise ConfigError(f"generation.guidance_scale: must be >= 1, got {cfg.generation.guidance_scale}")
    if not cfg.data.path and cfg.model.pretrained != "toy":
        raise ConfigError("data.path: required unless model.pretrained is 'toy' (the embedded toy world)")
    return cfg


def get_by_path(cfg: Any, dotted: str) -> Any:
    """``get_by_path(cfg, "train.lr")`` -> ``cfg.train.lr``."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# ----------------------------------------------------------------------------- public API


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (security checks included:
    :mod:`spin_ray.config_security`)."""
    from spin_ray.config_security import check_config_security  # it imports ConfigError from here

    cfg = _validate(_build(Config, values, ""))
    check_config_security(to_dict(cfg))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML-ready)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-5"`` -> ``("train.lr", 1e-5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:  # e.g. "train.lr=[1," : one line, not a traceback
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    return key, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested mapping (a copy); unknown keys fail."""
    result = _deep_copy(values)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(result, key, value)
    return result


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


def _set_path(values: dict[str, Any], dotted: str, value: Any) -> None:
    cls: Any = Config
    node = values
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        known = _field_types(cls)
        if part not in known:
            raise ConfigError(_unknown_key_message(part, list(known), prefix))
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = known[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section; cannot set {dotted!r}")
        node = node.setdefault(part, {})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults), apply ``key=value`` overrides, validate."""
    values = load_yaml(path) if path is not None else {}
    if "sweep" in values:
        raise ConfigError(f"{path}: has a top-level 'sweep:' section, so it is a sweep config: "
                          f"run it with python jobs/sweep.py --config {path}")
    return build_config(values, overrides or [], source=path)


COMMAND_LINE = "command line"
"""How an error names the ``key=value`` overrides as the source of a bad value."""


def build_config(values: dict[str, Any], overrides: list[str], source: str | Path | None) -> Config:
    """:func:`from_dict` of the file's ``values`` with ``overrides`` applied; an error names
    where the bad value came from: ``command line`` or the file ``source``."""
    try:
        merged = apply_overrides(values, overrides)
        for text in overrides:  # type errors of an override are the command line's own
            key, value = parse_override(text)
            _coerce(value, _type_at(key), key)
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    try:
        return from_dict(merged)
    except ConfigError as err:
        raise blame(err, source, overrides, lambda: from_dict(values)) from None


def blame(err: ConfigError, source: str | Path | None, overrides: Sequence[str],
          file_alone: Callable[[], object]) -> ConfigError:
    """``err`` prefixed with its origin: the file ``source`` if the file alone (``file_alone``
    builds it) fails the same way, else the command line (its overrides caused it)."""
    if source is not None and (not overrides or _fails_with(file_alone, str(err))):
        return ConfigError(f"{source}: {err}")
    return ConfigError(f"{COMMAND_LINE}: {err}")


def _fails_with(build: Callable[[], object], message: str) -> bool:
    try:
        build()
    except ConfigError as other:
        return str(other) == message
    return False


def _type_at(dotted: str) -> Any:
    """The annotation of the dotted key (checked to exist by :func:`apply_overrides`)."""
    tp: Any = Config
    for part in dotted.split("."):
        tp = _field_types(tp)[part]
    return tp


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` of it gives back ``cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that validates a whole :class:`Config` again."""
    new = dataclasses.replace(cfg, **changes)
    return _validate(new) if isinstance(new, Config) else new


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key overrides (values already typed), validated."""
    values = to_dict(cfg)
    for key, value in overrides.items():
        _set_path(values, key, value)
    return from_dict(values)

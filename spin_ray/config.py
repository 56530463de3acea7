"""Typed, frozen configuration tree for spin-ray.

Every YAML key is spelled exactly like the dataclass field it fills, and every field is
passed under that name to the code it configures, so ``grep`` leads from a config key to
the code that uses it. Load with :func:`load_config`; override with ``key=value`` pairs
whose keys are dotted paths (``loss.beta=[2000,5000]``, ``train.lr=1e-5``).

Per-iteration hyperparameters (``loss.beta``, ``train.lr``, ``train.steps``,
``train.warmup_steps``) accept a
scalar (the same value every iteration) or a list with one value per self-play iteration;
read them with :func:`per_iteration`.

This module is the schema: the dataclasses and their documented fields. Loading and
overrides live in :mod:`spin_ray.config_load`, the type and range checks in
:mod:`spin_ray.config_validate`; the loading functions are importable from here as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from spin_ray.config_baselines import (  # noqa: F401  (re-exported: spin_ray.config is the schema)
    BaselinesConfig,
    DpoBaselineConfig,
    LrSchedule,
    SftBaselineConfig,
)
from spin_ray.config_tracking import PublishConfig, TrackingConfig
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
    format: Literal["pickapic", "parquet", "folder", "hf"] = "pickapic"
    """``pickapic``: Pick-a-Pic v2 schema (winner of jpg_0/jpg_1 by label_0); ``parquet``:
    one image column and one caption column; ``folder``: images plus metadata.jsonl/csv;
    ``hf``: a Hugging Face ``datasets`` folder (``save_to_disk``; a DatasetDict's ``train``
    split) or a hub dataset id, with Pick-a-Pic's columns or an image and a caption column."""
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
    synthetic_states: Literal["forward", "reverse"] = "forward"
    """Where the synthetic branch's noisy states come from. ``forward`` (the paper's experiments,
    eq. 4.9): the forward process applied to theta_k's finished image. ``reverse`` (eq. C.5):
    the state x'_t at a random step of theta_k's own sampling trajectory, with theta_k's
    conditional noise prediction there as the synthetic target (:mod:`spin_ray.loss`)."""


BaselineName = Literal["sft", "dpo"]
OpponentChoice = Literal["previous", "initial"]
"""The baselines a run can train beside self-play (``self_play.baselines``)."""


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
    warmup_steps: int | list[int] = 200
    """Linear warm-up steps, restarted every iteration; scalar or one value per iteration (0: none).
    A warm-up as long as the iteration's steps or longer never reaches ``train.lr``: the stage
    prints the peak it does reach and records it as ``peak_lr`` in its metrics.json."""
    lr_schedule: LrSchedule = "linear"
    """After warm-up: ``linear`` decay to 0 at the last step, ``cosine`` decay to 0, or ``constant``."""
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
    eval_every: int = 0
    """Score a checkpoint every N optimizer steps (and the last) on ``eval.selection_prompts``
    after the stage trains (0: never); the scores are the stage's training curve (Fig. 7)."""
    keep: Literal["last", "best"] = "last"
    """Which checkpoint a stage publishes: ``last``, or ``best`` on the selection prompts' average
    score (needs ``eval_every``)."""


@dataclass(frozen=True)
class SelfPlayConfig:
    """The outer loop: theta_{k+1} is trained against theta_k."""

    iterations: int = 3
    """Number of self-play iterations K."""
    sft_baseline: bool = False
    """A synonym for listing ``sft`` in ``baselines`` (kept for older configs): also train the SFT
    baseline. ``true`` together with a ``baselines`` list adds ``sft`` to it if missing."""
    baselines: list[BaselineName] = field(default_factory=list)
    """Baselines trained from theta_0 before the iterations, each a stage ``baseline_<name>/``
    with its own schedule (``baselines.<name>.*``): ``sft`` (plain denoising loss on the real
    images) and ``dpo`` (Diffusion-DPO on the data's winner/loser pairs; needs ``data.format:
    pickapic``). The report shows each as its own row."""
    opponent: OpponentChoice = "previous"
    """Who plays the opponent of iteration k (generates its synthetic images and, as the
    reference, gives the loss its errors): ``previous`` is theta_{k-1} (the paper's
    Algorithm 1); ``initial`` is theta_0, the base model, in every iteration (Fig. 5's ablation:
    training continues against the fixed base). Either way theta starts from theta_{k-1}'s
    weights, so with ``initial`` iteration k's first logits are not 0 for k > 1."""
    opponent_history: int = 1
    """N: iteration k trains on opponents of theta_{k-1} .. theta_{k-N} (those that exist),
    mixed in equal shares: of its n samples, each earlier iteration j = k-1 .. k-h+1 (h =
    min(N, k)) gives n // h of the opponent rows cached in ``iter_<j>/opponents/`` (chosen by a draw seeded
    with ``seed``, k and j) and theta_{k-1} generates the rest for new real rows. The earlier
    rows are copied into iteration k's own cache first, their reference errors recomputed by
    theta_{k-1} (``loss.reference: precomputed``; ``online``: by the trainer), so the loss
    always compares theta with theta_{k-1} (SPIN for language models, Chen et al. 2024, mixes
    iterations t and t-1). 1 (the paper): only theta_{k-1}'s own opponents. The trainer reads
    the copied rows first, then the new ones."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of every model once the iterations are done (and by ``jobs/evaluate.py``)."""

    enabled: bool = False
    """Evaluate theta_0, each theta_k (and the SFT baseline) after the last iteration."""
    prompts: str | list[str] = ""
    """Prompt set(s) of the report: a text file (one prompt a line), PartiPrompts.tsv, Pick-a-Pic
    parquet (a split file or dir), an HPSv2 benchmark dir, or ``toy`` (the toy world's held-out prompts)."""
    selection_prompts: str | list[str] = ""
    """Prompt set(s) that choose between models (sweep trials, checkpoints): validation prompts,
    kept apart from ``eval.prompts``, the report's test prompts. The same kinds of set as
    ``eval.prompts``, plus ``toy_selection`` (held-out toy prompts that ``toy`` does not hold);
    the first set ranks. Empty: nothing may select (a sweep fails and says so)."""
    allow_selection_on_report_prompts: bool = False
    """Let ``eval.selection_prompts`` share a set with ``eval.prompts`` (then the report's
    numbers are biased upwards by the selection); without it such a config is refused."""
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
    lease_stale_s: float = 120.0
    """One driver per run directory (:mod:`spin_ray.run_lease`): a lease whose holder has not
    renewed it for this many seconds is taken over (its driver is presumed dead)."""


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
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


PER_ITERATION_KEYS = ("loss.beta", "train.lr", "train.steps", "train.warmup_steps")
"""Keys that take a scalar or one value per iteration (read with :func:`per_iteration`)."""
PER_ITERATION_MAY_BE_ZERO = ("train.warmup_steps",)
"""Per-iteration keys whose values may be 0 (the others must be positive)."""


def per_iteration(value: Any, iteration: int) -> Any:
    """The value of a per-iteration field for 1-based ``iteration`` (scalar or list)."""
    if isinstance(value, list):
        return value[iteration - 1]
    return value


BASELINE_ORDER: tuple[str, ...] = ("sft", "dpo")
"""The order baselines train in, and their rows in the report."""


def baseline_names(cfg: Config) -> list[str]:
    """The baselines this run trains, in :data:`BASELINE_ORDER`: ``self_play.baselines`` plus
    ``sft`` when ``self_play.sft_baseline`` is true."""
    wanted = set(cfg.self_play.baselines) | ({"sft"} if cfg.self_play.sft_baseline else set())
    return [name for name in BASELINE_ORDER if name in wanted]


def get_by_path(cfg: Any, dotted: str) -> Any:
    """``get_by_path(cfg, "train.lr")`` -> ``cfg.train.lr``."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# ----------------------------------------------------------------------------- loading (re-exported)

# ``from spin_ray.config import load_config`` (and every other name of spin_ray.config_load's
# __all__) keeps working: the name is fetched from spin_ray.config_load on first use (PEP 562).
# spin_ray.config_load imports the classes above, so importing it here eagerly would be a cycle
# that breaks whenever spin_ray.config_load is the first of the two to be imported.


def __getattr__(name: str) -> Any:
    """A public name of :mod:`spin_ray.config_load`, imported on first use and then kept here."""
    if not name.startswith("_"):
        from spin_ray import config_load

        if name in config_load.__all__:
            value = globals()[name] = getattr(config_load, name)
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

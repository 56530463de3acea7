"""The pair row: the one description of the columns that flow from the prepared table through
the opponent generator to the trainer (docs/DESIGN.md section 3.1).

:data:`COLUMNS` names every column, its dtype on disk and in Ray Data batches, its per-row
shape and which batches carry it; the column lists the pipeline selects
(:data:`PAIR_COLUMNS`, :data:`SFT_COLUMNS`), the list the generator adds
(:data:`GENERATED_COLUMNS`) and the trainer's :class:`PairBatch` are all read from here, so a
new column is added in this module (and computed where it is made). The names and dtypes are
those of the opponent files written by earlier runs (``iter_<k>/opponents/``): changing one
would stop those caches from being read back.

No torch, no Ray here: every Ray Data worker process that runs a small row function of
:mod:`spin_ray.pairs` imports this module (see the note at the top of
:mod:`spin_ray.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Column:
    """One column of a pair row."""

    name: str
    dtype: str
    """NumPy dtype of the values (``str`` for text, which the trainer never receives:
    ``iter_torch_batches`` cannot carry strings)."""
    shape: str
    """Shape of one row's value: ``()`` for a scalar; L, D: text tokens and embedding width;
    C, h, w: latent channels and size."""
    doc: str
    generated: bool = False
    """Added by the opponent generator (or, for SFT, by :func:`spin_ray.pairs.sft_samples`)."""
    spin: bool = False
    """In the rows a SPIN trainer receives."""
    sft: bool = False
    """In the rows an SFT trainer receives."""
    reverse: bool = False
    """Generated, and in a SPIN trainer's rows, only with ``loss.synthetic_states: reverse`` (eq. C.5)."""


COLUMNS: tuple[Column, ...] = (
    Column("row_id", "int64", "()", "row of the prepared table (prepare.py)"),
    Column("prompt", "str", "()", "the caption (prepare.py); kept in the opponent files, never trained on"),
    Column("sample_id", "int64", "()", "repeat << 32 | row_id (pairs.sample_table): names the sample in "
           "every seed", spin=True, sft=True),
    Column("noise_seed", "int64", "()", "fixes t_i and eps_i of the loss: derive_seed(..., NOISE_STREAM)",
           generated=True, spin=True, sft=True),
    Column("prompt_embeds", "float16", "(L, D)", "CLIP text embedding c_i (prepare.py); float16 to halve the "
           "bytes, cast to float32 by pair_batch", spin=True, sft=True),
    Column("latents_real", "float32", "(C, h, w)", "VAE latent x0_i of the real image (prepare.py)",
           spin=True, sft=True),
    Column("latents_syn", "float32", "(C, h, w)", "the opponent's DDIM sample x0'_i, never VAE-decoded; "
           "for the DPO baseline the loser's latents_lose (pairs.dpo_pairs)", generated=True, spin=True),
    Column("latents_lose", "float32", "(C, h, w)", "VAE latent of the Pick-a-Pic loser (prepare.py; only "
           "when a DPO baseline is configured); becomes latents_syn in the DPO baseline's pairs"),
    Column("ref_mse_real", "float32", "()", "the opponent's denoising error on x0_i at (t_i, eps_i); NaN when "
           "the trainer computes the reference online", generated=True, spin=True),
    Column("ref_mse_syn", "float32", "()", "the same on x0'_i", generated=True, spin=True),
    Column("generated_at", "float64", "()", "unix time the batch was generated", generated=True),
    Column("latents_syn_t", "float32", "(C, h, w)", "eq. C.5: the state x'_t at one step of the opponent's own "
           "DDIM trajectory, drawn per sample (trajectory.py)", reverse=True),
    Column("eps_syn_target", "float32", "(C, h, w)", "eq. C.5: the opponent's conditional noise prediction at "
           "latents_syn_t, the synthetic branch's target", reverse=True),
    Column("timestep_syn", "int64", "()", "eq. C.5: the sampler's timestep t of latents_syn_t", reverse=True),
    Column("timestep_syn_prev", "int64", "()", "eq. C.5: the sampler's previous timestep t_prev (the step "
           "goes t -> t_prev; negative at the last step), for h_{t,t_prev}", reverse=True),
)

BY_NAME: dict[str, Column] = {column.name: column for column in COLUMNS}

PAIR_COLUMNS: list[str] = [column.name for column in COLUMNS if column.spin]
"""The columns of a SPIN trainer's rows (no strings: ``iter_torch_batches`` can't carry them)."""
SFT_COLUMNS: list[str] = [column.name for column in COLUMNS if column.sft]
"""The columns of an SFT trainer's rows: the real half of a pair."""
GENERATED_COLUMNS: list[str] = [column.name for column in COLUMNS if column.generated]
"""What the opponent generator adds to its input rows."""
REVERSE_COLUMNS: list[str] = [column.name for column in COLUMNS if column.reverse]
"""What the generator adds, and a SPIN trainer receives, with ``loss.synthetic_states: reverse``."""


def pair_columns(synthetic_states: str = "forward") -> list[str]:
    """A SPIN trainer's columns: :data:`PAIR_COLUMNS`, plus :data:`REVERSE_COLUMNS` with ``reverse``."""
    return PAIR_COLUMNS + (REVERSE_COLUMNS if _reverse(synthetic_states) else [])


def generated_columns(synthetic_states: str = "forward") -> list[str]:
    """What the opponent generator adds: :data:`GENERATED_COLUMNS`, plus :data:`REVERSE_COLUMNS` with ``reverse``."""
    return GENERATED_COLUMNS + (REVERSE_COLUMNS if _reverse(synthetic_states) else [])


def _reverse(synthetic_states: str) -> bool:
    if synthetic_states not in ("forward", "reverse"):
        raise ValueError(f"loss.synthetic_states: expected forward or reverse, got {synthetic_states!r}")
    return synthetic_states == "reverse"


def dtype_of(name: str) -> str:
    """The NumPy dtype of column ``name``."""
    return BY_NAME[name].dtype


@dataclass(frozen=True)
class PairBatch:
    """A batch of (real, synthetic) pairs as the trainer uses it: the trainer's columns
    (:data:`PAIR_COLUMNS`) but ``sample_id``, as tensors with batch dimension B first.

    ``ref_mse_real``/``ref_mse_syn`` are None when the reference is computed online; the
    :data:`REVERSE_COLUMNS` are None unless the rows carry them (``loss.synthetic_states: reverse``).
    """

    latents_real: torch.Tensor
    latents_syn: torch.Tensor
    prompt_embeds: torch.Tensor
    noise_seed: torch.Tensor
    ref_mse_real: torch.Tensor | None = None
    ref_mse_syn: torch.Tensor | None = None
    latents_syn_t: torch.Tensor | None = None
    eps_syn_target: torch.Tensor | None = None
    timestep_syn: torch.Tensor | None = None
    timestep_syn_prev: torch.Tensor | None = None

    @classmethod
    def from_columns(cls, columns: dict[str, Any]) -> PairBatch:
        """Build from a column dict as is (as ``iter_torch_batches`` yields it); SFT rows
        have no ``latents_syn`` and get the real latents in its place."""
        values = {field.name: columns.get(field.name) for field in fields(cls)}
        if values["latents_syn"] is None:
            values["latents_syn"] = columns["latents_real"]
        missing = [name for name, value in values.items() if value is None and name not in _MAY_BE_ABSENT]
        if missing:
            raise KeyError(f"pair batch: no column {missing[0]!r}; columns are {sorted(columns)}")
        return cls(**values)


_OPTIONAL = ("ref_mse_real", "ref_mse_syn")
_MAY_BE_ABSENT = (*_OPTIONAL, *REVERSE_COLUMNS)


def pair_batch(columns: dict[str, Any], *, online_reference: bool) -> PairBatch:
    """The trainer's :class:`PairBatch` of a batch of rows: prompt embeddings to float32
    (they travel as float16); with an online reference the precomputed errors are dropped,
    so the loss computes them with theta_k."""
    columns = dict(columns)
    columns["prompt_embeds"] = columns["prompt_embeds"].float()
    if online_reference:
        for name in _OPTIONAL:
            columns.pop(name, None)
    return PairBatch.from_columns(columns)

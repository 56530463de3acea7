"""Helpers every scorer shares: option parsing, file checks, strict weight loading, batching.

The scorers load published weights from local paths. A wrong path or a weight file from a
different model must fail loudly at load time, naming the file and what was expected,
instead of silently scoring with randomly initialised layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from spin_ray.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class WeightsError(UserError, ValueError):
    """A weight file is missing keys, has unexpected keys, or has tensors of the wrong shape."""


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype option (``float32``, ``float16``, ``bfloat16``) to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype option {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_batch_size(batch_size: int) -> int:
    """Validate the ``batch_size`` option (images per forward pass)."""
    if batch_size < 1:
        raise ValueError(f"batch_size option must be >= 1, got {batch_size}")
    return batch_size


def require_file(path: str | Path, scorer: str, expected: str) -> Path:
    """Return ``path`` as a Path if it is a file, else raise naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{scorer}: weight file {path} not found; expected {expected}")
    return path


def require_dir(path: str | Path, scorer: str, expected: str) -> Path:
    """Return ``path`` as a Path if it is a directory, else raise naming it and what it should hold."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{scorer}: directory {path} not found; expected {expected}")
    return path


def read_state_dict(path: Path, scorer: str) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``d state dict safely (``weights_only=True``).

    Accepts a plain state dict or a checkpoint that wraps it as ``{"state_dict": ...}``
    (the HPSv2 files do); a ``module.`` prefix left by DistributedDataParallel is removed.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or non-torch file: name it
        raise WeightsError(f"{scorer}: cannot read {path} as a torch state dict: {error}") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{scorer}: {path} does not hold a state dict (a mapping of names to tensors)")
    state = dict(loaded)
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def check_state_dict(
    expected_shapes: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], path: Path, scorer: str, expected: str
) -> None:
    """Raise a :class:`WeightsError` naming the file and every missing, unexpected or wrongly
    shaped key of ``state`` compared with ``expected_shapes`` (key -> shape)."""
    missing = sorted(set(expected_shapes) - set(state))
    unexpected = sorted(set(state) - set(expected_shapes))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs expected {tuple(expected_shapes[key])}"
        for key in sorted(set(expected_shapes) & set(state))
        if state[key].shape != expected_shapes[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_preview(mismatched)}")
    if problems:
        raise WeightsError(f"{scorer}: {path} does not match {expected}: " + "; ".join(problems))


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, scorer: str, expected: str
) -> None:
    """Load ``state`` into ``module`` after :func:`check_state_dict`, so a wrong file fails with
    the file's name and the offending keys instead of torch's generic error."""
    expected_shapes = {key: value.shape for key, value in module.state_dict().items()}
    check_state_dict(expected_shapes, state, path, scorer, expected)
    module.load_state_dict(state, strict=True)


def check_loading_info(loading_info: Mapping[str, list], path: Path, scorer: str, expected: str) -> None:
    """Raise when ``from_pretrained(..., output_loading_info=True)`` left weights uninitialised.

    Unexpected keys are tolerated (transformers' own choice of what to skip); missing or
    mismatched ones would mean scoring with randomly initialised weights.
    """
    missing = sorted(loading_info.get("missing_keys", []))
    mismatched = sorted(str(item) for item in loading_info.get("mismatched_keys", []))
    if missing or mismatched:
        raise WeightsError(
            f"{scorer}: {path} does not match {expected}: missing keys {_preview(missing)}; "
            f"shape mismatch {_preview(mismatched)}"
        )


def _preview(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"


def check_inputs(images: Sequence[Image.Image], prompts: Sequence[str], scorer: str) -> None:
    """Scorers score image i against prompt i: the two sequences must pair up."""
    if len(images) != len(prompts):
        raise ValueError(f"{scorer}: got {len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{scorer}: images[{index}] is {type(image).__name__}; expected a PIL.Image.Image")


def score_in_batches(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    batch_size: int,
    score_batch: Callable[[list[Image.Image], list[str]], torch.Tensor],
    scorer: str,
) -> np.ndarray:
    """Run ``score_batch`` over consecutive slices of at most ``batch_size`` (image, prompt) pairs.

    Returns float32 scores of shape (N,), one per image, in input order.
    """
    check_inputs(images, prompts, scorer)
    rgb = [image.convert("RGB") for image in images]
    chunks = [
        score_batch(rgb[start : start + batch_size], list(prompts[start : start + batch_size]))
        .detach()
        .float()
        .cpu()
        .numpy()
        .reshape(-1)
        for start in range(0, len(rgb), batch_size)
    ]
    if not chunks:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


class BatchedScorer(ABC):
    """Base of the model scorers: scores (image, prompt) pairs in slices of at most
    ``batch_size``, one :meth:`_score_batch` forward pass each, on ``device`` in ``dtype``.
    Each scorer implements :meth:`_score_batch`."""

    name: str

    def __init__(self, device: str, dtype: torch.dtype, batch_size: int) -> None:
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Score image i against prompt i; returns float32 (N,)."""
        return score_in_batches(images, prompts, self.batch_size, self._score_batch, self.name)

    @abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one slice: (B,) or (B, 1)."""

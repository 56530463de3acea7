"""Reward models that score generated images, one module per scorer, one interface.

``load_scorer(name, **options)`` returns a :class:`Scorer`. Every scorer takes ``device``
(``cpu``/``cuda``), ``dtype`` (``float32``/``float16``/``bfloat16``) and ``batch_size``
options, plus its weight paths; ``path=DIR`` is a one-directory shorthand for them
(``eval.scorer_paths`` holds one path per scorer) and explicit options override it:

- ``pickscore``: ``model_path``, ``processor_path`` (default ``model_path``).
  ``path=DIR`` means ``model_path=DIR``.
- ``hpsv2``: ``weights_path``, ``model_name`` (default ``ViT-H-14``).
  ``path`` is the ``.pt`` file itself, or a directory holding ``HPS_v2.1_compressed.pt``
  (else ``HPS_v2_compressed.pt``).
- ``aesthetic``: ``clip_path``, ``head_path``.
  ``path=DIR`` means ``DIR/clip-vit-large-patch14`` and ``DIR/sac+logos+ava1-l14-linearMSE.pth``.
- ``imagereward``: ``weights_path``, ``med_config_path``, ``tokenizer_path``, ``vision_config``.
  ``path=DIR`` means ``DIR/ImageReward.pt``, ``DIR/med_config.json``, ``DIR/bert-base-uncased``.
- ``toy``: the fields of :class:`spin_ray.toy.reward.ToyScorer`; no weights (``device``,
  ``dtype`` and ``batch_size`` are accepted and ignored: it is numpy on CPU).

Scorer modules import lazily, so importing this package imports neither transformers nor
open_clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

SCORER_NAMES = ("pickscore", "hpsv2", "aesthetic", "imagereward", "toy")


@runtime_checkable
class Scorer(Protocol):
    """Scores image i against prompt i."""

    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """images: N PIL images, prompts: N strings -> float32 scores of shape (N,)."""
        ...


def load_scorer(name: str, path: str | Path | None = None, **options: Any) -> Scorer:
    """Build the scorer ``name`` (one of :data:`SCORER_NAMES`) from local weights.

    Args:
        name: scorer name.
        path: optional directory in the layout of the table above; explicit options win.
        **options: the scorer's loader keywords (weight paths, device, dtype, batch_size).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(SCORER_NAMES)}")
    if path is not None:
        options = {**_options_from_directory(name, Path(path)), **options}
    return _LOADERS[name](**options)


def _options_from_directory(name: str, path: Path) -> dict[str, Any]:
    if name == "pickscore":
        return {"model_path": path}
    if name == "hpsv2":
        return {"weights_path": _hps_file(path)}
    if name == "aesthetic":
        return {"clip_path": path / "clip-vit-large-patch14", "head_path": path / "sac+logos+ava1-l14-linearMSE.pth"}
    if name == "imagereward":
        return {
            "weights_path": path / "ImageReward.pt",
            "med_config_path": path / "med_config.json",
            "tokenizer_path": path / "bert-base-uncased",
        }
    raise ValueError(f"scorer {name!r} takes no path; got path={path}")


def _hps_file(path: Path) -> Path:
    """``path`` itself if it is a file, else the newest published HPS file in it (v2.1 before v2)."""
    if path.is_file():
        return path
    candidates = [path / "HPS_v2.1_compressed.pt", path / "HPS_v2_compressed.pt"]
    return next((candidate for candidate in candidates if candidate.is_file()), candidates[0])


def _load_pickscore(**options: Any) -> Scorer:
    from spin_ray.rewards.pickscore import load_pickscore

    return load_pickscore(**options)


def _load_hpsv2(**options: Any) -> Scorer:
    from spin_ray.rewards.hps import load_hpsv2

    return load_hpsv2(**options)


def _load_aesthetic(**options: Any) -> Scorer:
    from spin_ray.rewards.aesthetic import load_aesthetic

    return load_aesthetic(**options)


def _load_image_reward(**options: Any) -> Scorer:
    from spin_ray.rewards.image_reward import load_image_reward

    return load_image_reward(**options)


def _load_toy(**options: Any) -> Scorer:
    from spin_ray.toy.reward import ToyScorer

    # The toy reward is numpy on CPU: the options every other scorer takes do not apply.
    return ToyScorer(**{k: v for k, v in options.items() if k not in ("device", "dtype", "batch_size")})


_LOADERS: dict[str, Callable[..., Scorer]] = {
    "pickscore": _load_pickscore,
    "hpsv2": _load_hpsv2,
    "aesthetic": _load_aesthetic,
    "imagereward": _load_image_reward,
    "toy": _load_toy,
}

__all__ = ["SCORER_NAMES", "Scorer", "load_scorer"]

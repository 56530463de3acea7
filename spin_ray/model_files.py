"""Weights files of a model directory: safetensors only (issue 19, item 6; docs/SECURITY.md).

A pickle weights file (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``) runs code when it is
unpickled. The loaders never unpickle (``use_safetensors=True``), so a component holding only
such files would fail inside diffusers with a message about missing files; this check names the
directory, the pickle files and the fix before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from spin_ray.errors import ModelDirError

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
"""The components of a diffusers Stable Diffusion directory that hold weights."""
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"


def check_safetensors_only(root: str | os.PathLike[str], components: tuple[str, ...] = WEIGHT_COMPONENTS) -> None:
    """Refuse a diffusers directory where a weights component (``unet/``, ``vae/``,
    ``text_encoder/``) has pickle weights and no ``.safetensors`` file, with a
    :class:`~spin_ray.errors.ModelDirError` naming the folder and its pickle files. A component
    with safetensors weights passes (pickle files beside them are never read); a missing
    component is left to the directory check (:func:`spin_ray.diffusion._check_pipeline_dir`)."""
    base = Path(root)
    for name in components:
        folder = base / name
        if not folder.is_dir():
            continue
        files = [path for path in folder.iterdir() if path.is_file()]
        pickles = sorted(path.name for path in files if path.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(path.name.endswith(SAFETENSORS_SUFFIX) for path in files):
            raise ModelDirError(
                f"{folder}: weights only as pickle ({', '.join(pickles)}); spin-ray reads safetensors only, as "
                f"unpickling a file can run code. Convert them where you trust the file (diffusers: load and "
                f"save_pretrained(..., safe_serialization=True)) or use a safetensors release (docs/SECURITY.md)")

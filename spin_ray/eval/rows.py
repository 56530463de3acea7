"""The evaluation's rows: one row per image, from the prompt rows in to the scored rows out.

The pipeline (:mod:`spin_ray.eval.scoring`) takes P x N prompt rows ``prompt_index, prompt,
image_index, seed``, adds ``image`` (PNG bytes) and one float32 column per scorer; this module
names those columns, draws the seeds and turns the scored rows back into arrays
(:func:`gather_scores`) and the image grid's images (:func:`grid_images`). numpy and PIL only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

ROW_COLUMNS = ("prompt_index", "prompt", "image_index", "seed")
"""The prompt rows' columns, carried through every stage of the pipeline."""
IMAGE_COLUMN = "image"
"""PNG bytes; kept only for the image grid's images (empty elsewhere) once scored."""
GRID_PROMPTS = 8
"""Columns (prompts) of the image grid: the first few prompts, image 0 of each."""
SEED_TAG = 0x5EED_E7A1
"""Separates the evaluation seeds from the training streams of :func:`spin_ray.generation.derive_seed`."""


def image_seed(eval_seed: int, prompt_index: int, image_index: int) -> int:
    """The 63-bit seed of image ``image_index`` of prompt ``prompt_index``: the same for every
    model, so the models' images differ only by the model (common random numbers)."""
    entropy = [SEED_TAG, int(eval_seed), int(prompt_index), int(image_index)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def prompt_rows(prompts: Sequence[str], num_images: int, eval_seed: int) -> list[dict[str, Any]]:
    """The pipeline's input: P x N rows ``prompt_index, prompt, image_index, seed``, prompt-major."""
    return [
        {"prompt_index": p, "prompt": prompt, "image_index": i, "seed": image_seed(eval_seed, p, i)}
        for p, prompt in enumerate(prompts)
        for i in range(num_images)
    ]


def png_bytes(image: Image.Image) -> bytes:
    """An image as the ``image`` column holds it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gather_scores(
    columns: Mapping[str, Sequence[Any]], scorers: Sequence[str], num_prompts: int, num_images: int
) -> dict[str, np.ndarray]:
    """Scored rows (any order) -> scorer -> (P, N) float32, entry [p, i] from the row with
    ``prompt_index`` p and ``image_index`` i; every (p, i) must occur exactly once."""
    missing_columns = [c for c in ("prompt_index", "image_index", *scorers) if c not in columns]
    if missing_columns:
        raise ValueError(f"scored rows lack the columns {missing_columns}; they have {sorted(columns)}")
    prompt_index = np.asarray(columns["prompt_index"], dtype=np.int64)
    image_index = np.asarray(columns["image_index"], dtype=np.int64)
    if ((prompt_index < 0) | (prompt_index >= num_prompts) | (image_index < 0) | (image_index >= num_images)).any():
        raise ValueError(f"scored rows: an index is outside {num_prompts} prompts x {num_images} images")
    counts = np.zeros((num_prompts, num_images), dtype=np.int64)
    np.add.at(counts, (prompt_index, image_index), 1)
    if (counts != 1).any():
        bad = [(int(p), int(i)) for p, i in np.argwhere(counts != 1)[:5]]
        raise ValueError(f"scored rows: (prompt_index, image_index) pairs {bad} are missing or repeated; "
                         "expected every pair exactly once")
    result = {}
    for name in scorers:
        array = np.empty((num_prompts, num_images), dtype=np.float32)
        array[prompt_index, image_index] = np.asarray(columns[name], dtype=np.float32)
        result[name] = array
    return result


def grid_images(columns: Mapping[str, Sequence[Any]], num_prompts: int) -> list[Image.Image]:
    """Image 0 of prompts 0..num_prompts-1, decoded from the rows' PNG bytes, in prompt order."""
    by_prompt = {
        int(p): raw for p, i, raw in zip(columns["prompt_index"], columns["image_index"], columns[IMAGE_COLUMN],
                                         strict=True)
        if int(i) == 0 and int(p) < num_prompts
    }
    missing = [p for p in range(num_prompts) if not by_prompt.get(p)]
    if missing:
        raise ValueError(f"scored rows: no stored image 0 for prompts {missing}")
    return [Image.open(io.BytesIO(bytes(by_prompt[p]))).convert("RGB") for p in range(num_prompts)]

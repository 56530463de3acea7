"""The procedural toy world: coloured shapes on coloured backgrounds.

Prompts come from a small grammar::

    a [small|large] <colour> <shape> [at the left|right|top|bottom] on a <colour> background

and each prompt renders deterministically (from a seed) to a small RGB image with PIL.
Seeds jitter the position, size and colours slightly so that no two images are identical.
Rendering blends the background and foreground colours through the shape's anti-aliased
coverage mask (:func:`shape_coverage`); the toy reward (:mod:`spin_ray.toy.reward`) reuses
the same geometry as its templates.

Splits: a fixed share of the (shape, colour, background) triples is held out; training
rows use only the other triples, so :func:`validation_prompts` tests composition, not
memory.

Data sets written here:
- :func:`write_pickapic_parquet`: the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0,
  label_1, ...), winner = correct rendering, loser = a rendering of a perturbed prompt;
  read it with ``spin_ray.data`` (``format: pickapic``) exactly like the real data.
- :func:`write_image_text_parquet`: plain (caption, image) rows, optionally from the
  *shifted* distribution (:func:`render_shifted`), to pretrain a deliberately imperfect
  toy base model that self-play can then improve.
"""

from __future__ import annotations

import datetime
import io
import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 50),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")

SIZE_RADIUS = {None: 0.22, "small": 0.14, "large": 0.32}
"""Half the shape's extent, as a fraction of the image side, before jitter."""
RADIUS_JITTER = 0.1
"""Relative jitter of the radius (uniform, +-)."""
CENTRE_JITTER = 0.04
"""Jitter of the centre (uniform, +-, fraction of the side) without a position word."""
EDGE_MARGIN = 0.04
"""Gap between a positioned shape and its image edge, plus up to ``EDGE_JITTER``."""
EDGE_JITTER = 0.03
COLOUR_JITTER = 12
"""Per-channel colour jitter (uniform, +-, 0..255 scale)."""

HELDOUT_FRACTION = 0.15
SPLIT_SEED = 2402_10210
"""Fixes which (shape, colour, background) triples are held out; never change it."""

_CROSS_A, _CROSS_B = 0.33, 0.67
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    # Vertices in the unit box [0, 1]^2 (x right, y down); the circle is drawn as an ellipse.
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [(_CROSS_A, 0), (_CROSS_B, 0), (_CROSS_B, _CROSS_A), (1, _CROSS_A), (1, _CROSS_B),
              (_CROSS_B, _CROSS_B), (_CROSS_B, 1), (_CROSS_A, 1), (_CROSS_A, _CROSS_B), (0, _CROSS_B),
              (0, _CROSS_A), (_CROSS_A, _CROSS_A)],
}

_PROMPT_RE = re.compile(
    r"^a (?:(?P<size>\w+) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: at the (?P<position>\w+))? on a (?P<background>\w+) background$"
)
GRAMMAR = "a [small|large] <colour> <shape> [at the left|right|top|bottom] on a <colour> background"

Split = Literal["train", "validation"]


@dataclass(frozen=True)
class ToyPrompt:
    """One parsed toy prompt; ``str(prompt)`` gives its text."""

    shape: str
    colour: str
    background: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        _check_word("shape", self.shape, SHAPES)
        _check_word("colour", self.colour, tuple(COLOURS))
        _check_word("background", self.background, tuple(COLOURS))
        if self.size is not None:
            _check_word("size", self.size, SIZES)
        if self.position is not None:
            _check_word("position", self.position, POSITIONS)
        if self.colour == self.background:
            raise ValueError(f"toy prompt: colour and background are both {self.colour!r}; they must differ")

    @property
    def triple(self) -> tuple[str, str, str]:
        """(shape, colour, background): the unit of the train/validation split."""
        return (self.shape, self.colour, self.background)

    def __str__(self) -> str:
        size = f"{self.size} " if self.size else ""
        position = f" at the {self.position}" if self.position else ""
        return f"a {size}{self.colour} {self.shape}{position} on a {self.background} background"


def _check_word(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"toy prompt: {field} {value!r} is not one of {', '.join(allowed)}")


def parse_prompt(prompt: str) -> ToyPrompt:
    """Parse a toy-grammar prompt; ``ValueError`` names the prompt and the grammar."""
    match = _PROMPT_RE.match(prompt.strip())
    if match is None:
        raise ValueError(f"toy prompt {prompt!r} does not follow the grammar {GRAMMAR!r}")
    try:
        return ToyPrompt(**match.groupdict())
    except ValueError as err:
        raise ValueError(f"toy prompt {prompt!r}: {err}") from None


# ----------------------------------------------------------------------------- splits


def all_triples() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s, c, b in product(SHAPES, COLOURS, COLOURS) if c != b]


def heldout_triples() -> frozenset[tuple[str, str, str]]:
    """The triples reserved for validation (a fixed, seeded share of all triples)."""
    triples = all_triples()
    count = round(HELDOUT_FRACTION * len(triples))
    return frozenset(random.Random(SPLIT_SEED).sample(triples, count))


def split_triples(split: Split) -> list[tuple[str, str, str]]:
    """The triples of ``split`` (``train`` or ``validation``), in a fixed order."""
    heldout = heldout_triples()
    if split == "train":
        return [t for t in all_triples() if t not in heldout]
    if split == "validation":
        return [t for t in all_triples() if t in heldout]
    raise ValueError(f"toy split {split!r}: expected 'train' or 'validation'")


def sample_prompt(rng: random.Random, split: Split = "train") -> ToyPrompt:
    """A random prompt of ``split``: half have no size word, half no position word."""
    shape, colour, background = rng.choice(split_triples(split))
    size = rng.choice(SIZES) if rng.random() < 0.5 else None
    position = rng.choice(POSITIONS) if rng.random() < 0.5 else None
    return ToyPrompt(shape, colour, background, size, position)


def validation_prompts() -> list[str]:
    """The held-out evaluation prompts: each held-out triple plain, then with modifiers.

    The plain prompts come first, so ``max_prompts`` keeps the simplest ones.
    """
    rng = random.Random(SPLIT_SEED)
    triples = split_triples("validation")
    plain = [str(ToyPrompt(*t)) for t in triples]
    modified = []
    for triple in triples:
        size = rng.choice((None, *SIZES))
        position = rng.choice(POSITIONS) if size is None else rng.choice((None, *POSITIONS))
        modified.append(str(ToyPrompt(*triple, size=size, position=position)))
    return plain + modified


SELECTION_SEED = SPLIT_SEED + 1
"""Fixes the prompts of :func:`selection_prompts`; never change it."""


def selection_prompts() -> list[str]:
    """Held-out prompts for choosing between models (``eval.selection_prompts: toy_selection``),
    none of them in :func:`validation_prompts` (the report's ``toy``): for each held-out triple,
    two variants with a size or position word that ``toy`` does not use, the first variant of
    every triple before the second ones. The triples are the same held-out ones (never trained
    on); the prompts, and so the evaluation seeds, are different."""
    rng = random.Random(SELECTION_SEED)
    report = set(validation_prompts())
    firsts, seconds = [], []
    for triple in split_triples("validation"):
        variants = [str(ToyPrompt(*triple, size=size, position=position))
                    for size in (None, *SIZES) for position in (None, *POSITIONS) if size or position]
        first, second = rng.sample([v for v in variants if v not in report], 2)
        firsts.append(first)
        seconds.append(second)
    return firsts + seconds


# ----------------------------------------------------------------------------- rendering


def shape_coverage(shape: str, box: tuple[float, float, float, float], size: tuple[int, int],
                   supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` drawn to fill ``box``.

    Args:
        shape: one of :data:`SHAPES`.
        box: (x0, y0, x1, y1) in pixels of the output (may be fractional or off-canvas).
        size: (width, height) of the output in pixels.
        supersample: drawing resolution factor; coverage is the box-filtered mask.

    Returns:
        float32 array (height, width) in [0, 1].
    """
    _check_word("shape", shape, SHAPES)
    width, height = size
    canvas = Image.new("L", (width * supersample, height * supersample), 0)
    x0, y0, x1, y1 = (v * supersample for v in box)
    # PIL fills the end pixel of a span too: stop one sub-pixel short so the area is exact.
    x1, y1 = x1 - 1, y1 - 1
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _POLYGONS[shape]], fill=255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Layout:
    """Where a rendered shape sits, in fractions of the image side."""

    centre_x: float
    centre_y: float
    radius: float


def expected_centre(position: str | None, radius: float) -> tuple[float, float]:
    """Mean centre (x, y) of a shape of ``radius`` at ``position`` (fractions of the side)."""
    offset = radius + EDGE_MARGIN + EDGE_JITTER / 2
    return {
        None: (0.5, 0.5),
        "left": (offset, 0.5),
        "right": (1 - offset, 0.5),
        "top": (0.5, offset),
        "bottom": (0.5, 1 - offset),
    }[position]


def sample_layout(prompt: ToyPrompt, rng: np.random.Generator) -> Layout:
    """Jittered radius and centre for ``prompt`` (fractions of the image side)."""
    radius = SIZE_RADIUS[prompt.size] * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
    jitter = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    edge = radius + EDGE_MARGIN + rng.uniform(0, EDGE_JITTER)
    x, y = 0.5 + jitter[0], 0.5 + jitter[1]
    if prompt.position == "left":
        x = edge
    elif prompt.position == "right":
        x = 1 - edge
    elif prompt.position == "top":
        y = edge
    elif prompt.position == "bottom":
        y = 1 - edge
    return Layout(x, y, radius)


def render(prompt: ToyPrompt | str, *, resolution: int = 32, seed: int = 0) -> Image.Image:
    """Render ``prompt`` as an RGB image of ``resolution`` x ``resolution`` pixels.

    Deterministic in (prompt, resolution, seed); the seed jitters position, size and colours.
    """
    toy = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = np.random.default_rng(seed)
    layout = sample_layout(toy, rng)
    side = resolution
    box = (
        (layout.centre_x - layout.radius) * side, (layout.centre_y - layout.radius) * side,
        (layout.centre_x + layout.radius) * side, (layout.centre_y + layout.radius) * side,
    )
    coverage = shape_coverage(toy.shape, box, (side, side))[..., None]
    background = _jittered(toy.background, rng)
    foreground = _jittered(toy.colour, rng)
    pixels = background * (1 - coverage) + foreground * coverage
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _jittered(colour: str, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    return np.clip(base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3), 0, 255)


def perturb_prompt(prompt: ToyPrompt, rng: random.Random,
                   kind: Literal["colour", "shape", "background"] | None = None) -> ToyPrompt:
    """``prompt`` with one attribute made wrong (the Pick-a-Pic loser); ``kind`` random if None."""
    kind = kind or rng.choice(("colour", "shape", "background"))
    if kind == "shape":
        return replace(prompt, shape=rng.choice([s for s in SHAPES if s != prompt.shape]))
    others = [c for c in COLOURS if c not in (prompt.colour, prompt.background)]
    if kind == "colour":
        return replace(prompt, colour=rng.choice(others))
    if kind == "background":
        return replace(prompt, background=rng.choice(others))
    raise ValueError(f"perturb kind {kind!r}: expected 'colour', 'shape' or 'background'")


def render_shifted(prompt: ToyPrompt | str, *, resolution: int = 32, seed: int = 0,
                   shift: float = 0.5, low_level: bool = True) -> Image.Image:
    """A systematically imperfect rendering of ``prompt``, for pretraining a toy base model.

    ``shift`` in [0, 1] sets how far the distribution is off: with probability ``0.5 * shift``
    the colour is wrong, with ``0.25 * shift`` the shape is wrong; colours are washed out
    towards grey by ``0.35 * shift``, the image is blurred (radius ``shift * resolution / 24``)
    and Gaussian pixel noise of std ``25 * shift`` (0..255 scale) is added. ``shift = 0`` gives
    :func:`render` exactly. ``low_level=False`` keeps only the wrong colours and shapes (a
    crisp image of a wrong prompt), without blur, wash-out or noise.
    """
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"shift: expected a value in [0, 1], got {shift}")
    toy = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    choice_rng = random.Random(f"shifted-{seed}")
    if choice_rng.random() < 0.5 * shift:
        toy = perturb_prompt(toy, choice_rng, "colour")
    if choice_rng.random() < 0.25 * shift:
        toy = perturb_prompt(toy, choice_rng, "shape")
    image = render(toy, resolution=resolution, seed=seed)
    if shift == 0.0 or not low_level:
        return image
    return low_level_flaws(image, seed=seed, shift=shift)


def low_level_flaws(image: Image.Image, *, seed: int, shift: float) -> Image.Image:
    """The prompt-independent part of :func:`render_shifted`: blur (radius ``shift * side / 24``),
    colours washed out towards grey by ``0.35 * shift``, Gaussian pixel noise of std ``25 * shift``."""
    image = image.filter(ImageFilter.GaussianBlur(radius=shift * image.size[0] / 24))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + 0.35 * shift * (pixels.mean(axis=-1, keepdims=True) - pixels)
    noise = np.random.default_rng([seed, 1]).normal(0.0, 25.0 * shift, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- data sets


def encode_image(image: Image.Image, image_format: Literal["JPEG", "PNG"] = "JPEG") -> bytes:
    """Encoded bytes of ``image`` (JPEG at quality 95 without chroma subsampling, or PNG)."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
])
"""The Pick-a-Pic v2 columns (``yuvalkirstain/pickapic_v2``) that the toy data fills."""


def pickapic_rows(n_rows: int, seed: int, resolution: int = 32, tie_fraction: float = 0.05,
                  split: Split = "train") -> list[dict]:
    """``n_rows`` Pick-a-Pic v2 style rows as dicts (see :data:`PICKAPIC_SCHEMA`).

    The winner is a correct rendering and the loser a rendering of a perturbed prompt (wrong
    colour, shape or background), each equally likely in position 0 or 1; a ``tie_fraction``
    share of rows are ties (two correct renderings, labels 0.5/0.5).
    """
    rng = random.Random(seed)
    start = datetime.datetime(2023, 4, 1)
    rows = []
    for index in range(n_rows):
        prompt = sample_prompt(rng, split)
        seed_a, seed_b = rng.getrandbits(31), rng.getrandbits(31)
        uids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2)]
        tie = rng.random() < tie_fraction
        winner = encode_image(render(prompt, resolution=resolution, seed=seed_a))
        second = prompt if tie else perturb_prompt(prompt, rng)
        other = encode_image(render(second, resolution=resolution, seed=seed_b))
        winner_first = rng.random() < 0.5
        label_0 = 0.5 if tie else float(winner_first)
        images = (winner, other) if winner_first else (other, winner)
        rows.append({
            "are_different": True,
            "best_image_uid": "" if tie else uids[0 if winner_first else 1],
            "caption": str(prompt),
            "created_at": start + datetime.timedelta(seconds=37 * index),
            "has_label": True,
            "image_0_uid": uids[0],
            "image_0_url": f"https://toy.invalid/{uids[0]}.jpg",
            "image_1_uid": uids[1],
            "image_1_url": f"https://toy.invalid/{uids[1]}.jpg",
            "jpg_0": images[0],
            "jpg_1": images[1],
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "model_0": "toy-renderer",
            "model_1": "toy-renderer",
            "ranking_id": index,
            "user_id": rng.randrange(1, 1000),
            "num_example_per_prompt": 1,
        })
    return rows


def write_pickapic_parquet(path: str | Path, n_rows: int, seed: int, resolution: int = 32,
                           tie_fraction: float = 0.05, split: Split = "train",
                           row_group_size: int | None = None) -> Path:
    """Write :func:`pickapic_rows` to one parquet file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(pickapic_rows(n_rows, seed, resolution, tie_fraction, split),
                                 schema=PICKAPIC_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def shifted_rows(n_rows: int, seed: int, resolution: int = 32, shift: float = 0.0,
                 split: Split = "train", low_level: bool = True) -> list[tuple[str, Image.Image]]:
    """``n_rows`` (prompt, image) pairs; images from :func:`render_shifted` with ``shift``
    and ``low_level``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        prompt = sample_prompt(rng, split)
        image = render_shifted(prompt, resolution=resolution, seed=rng.getrandbits(31), shift=shift,
                               low_level=low_level)
        rows.append((str(prompt), image))
    return rows


def write_image_text_parquet(path: str | Path, n_rows: int, seed: int, resolution: int = 32,
                             shift: float = 0.0, split: Split = "train", prompt_column: str = "caption",
                             image_column: str = "image") -> Path:
    """Write :func:`shifted_rows` as (``prompt_column``, ``image_column`` PNG bytes) parquet.

    Readable with ``spin_ray.data`` (``format: parquet``); returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = shifted_rows(n_rows, seed, resolution, shift, split)
    table = pa.table({
        prompt_column: pa.array([prompt for prompt, _ in rows], pa.string()),
        image_column: pa.array([encode_image(image, "PNG") for _, image in rows], pa.binary()),
    })
    pq.write_table(table, path)
    return path

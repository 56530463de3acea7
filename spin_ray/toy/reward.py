"""Analytic prompt-fidelity reward for the toy world (no learned weights).

For each (image, prompt) the scorer measures, from the pixels alone:

- ``background``: is the image border the prompted background colour?
- ``colour``: is the foreground (pixels far from the background) the prompted colour?
- ``shape``: does the foreground match the prompted shape? The foreground's soft mask is
  compared (IoU) with clean templates of every shape drawn into its bounding box.
- ``size`` / ``position`` (only when the prompt has them): is the foreground's extent /
  bounding-box centre closer to the prompted size / position than to the alternatives?

Every component is a soft probability in [0, 1] (Gaussian likelihoods over the
alternatives, normalised), so blurry 32x32 samples of a tiny diffusion model get partial
credit instead of a hard 0. The score is the geometric mean of the components: one clearly
wrong attribute pulls it down a lot, small imprecisions only a little.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spin_ray.toy.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS,
    ToyPrompt,
    expected_centre,
    parse_prompt,
    shape_coverage,
)

_PALETTE = {name: np.asarray(rgb, dtype=np.float32) / 255.0 for name, rgb in COLOURS.items()}
_FLOOR = 1e-4  # keeps log() finite in the geometric mean
Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels."""


@dataclass(frozen=True)
class ToyScorer:
    """Scores toy images for fidelity to their toy-grammar prompts."""

    colour_sigma: float = 0.12
    """Std of the colour likelihood (RGB distance, channels in [0, 1])."""
    other_colour_distance: float = 0.35
    """RGB distance at which "some other colour" becomes as likely as a palette colour."""
    shape_sharpness: float = 25.0
    """Softmax temperature^-1 over the shape templates' IoUs."""
    good_iou: float = 0.75
    """IoU with the prompted template that earns the full shape score."""
    size_sigma: float = 0.035
    """Std of the radius likelihood (fraction of the image side)."""
    position_sigma: float = 0.05
    """Std of the centre likelihood (fraction of the image side)."""
    name: str = "toy"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Prompt-fidelity of each image: float32 array (N,) in [0, 1]."""
        if len(images) != len(prompts):
            raise ValueError(f"ToyScorer.score: {len(images)} images but {len(prompts)} prompts")
        return np.asarray([self.score_one(image, prompt) for image, prompt in zip(images, prompts, strict=True)],
                          dtype=np.float32)

    def score_one(self, image: Image.Image, prompt: str) -> float:
        """Geometric mean of :meth:`components` for one image."""
        parts = np.asarray(list(self.components(image, prompt).values()), dtype=np.float64)
        return float(np.exp(np.mean(np.log(np.maximum(parts, _FLOOR)))))

    def components(self, image: Image.Image, prompt: str) -> dict[str, float]:
        """The per-attribute scores (each in [0, 1]) for one image and its prompt."""
        toy = parse_prompt(prompt)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        background = _border_colour(pixels)
        parts = {"background": self._colour_match(background, toy.background)}
        found = _foreground(pixels, background)
        if found is None:  # a flat image: nothing was drawn
            parts.update(colour=0.0, shape=0.0)
            parts.update({key: 0.0 for key in _optional_keys(toy)})
            return parts
        soft_mask, hard_mask = found
        parts["colour"] = self._colour_match(np.median(pixels[hard_mask], axis=0), toy.colour)
        fits = _fit_shapes(soft_mask, _robust_box(hard_mask))
        parts["shape"] = self._shape_match({shape: iou for shape, (iou, _) in fits.items()}, toy.shape)
        box = fits[toy.shape][1]
        height, width = hard_mask.shape
        # Radius from the area (robust to blur), as if the shape were the prompted one.
        radius = float(np.sqrt(soft_mask.sum() / (_fill_fraction(toy.shape) * width * height))) / 2
        if toy.size is not None:
            parts["size"] = self._size_match(radius, toy.size)
        if toy.position is not None:
            centre = ((box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height)
            parts["position"] = self._position_match(centre, radius, toy.position)
        return parts

    def _colour_match(self, rgb: np.ndarray, colour: str) -> float:
        """P(``rgb`` is ``colour``) among the palette plus an "other colour" class."""
        distances = np.asarray([np.linalg.norm(rgb - ref) for ref in _PALETTE.values()])
        likelihood = np.exp(-0.5 * (distances / self.colour_sigma) ** 2)
        other = np.exp(-0.5 * (self.other_colour_distance / self.colour_sigma) ** 2)
        return float(likelihood[list(_PALETTE).index(colour)] / (likelihood.sum() + other))

    def _shape_match(self, iou_by_shape: dict[str, float], shape: str) -> float:
        """Softmax over shapes of the mask-template IoU, scaled down when the prompted fit is poor."""
        ious = np.asarray([iou_by_shape[s] for s in SHAPES])
        logits = self.shape_sharpness * ious
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        target = SHAPES.index(shape)
        return float(probs[target] * min(1.0, ious[target] / self.good_iou))

    def _size_match(self, radius: float, size: str) -> float:
        """P(``size``) among small / unmarked / large, from the measured radius."""
        names = list(SIZE_RADIUS)
        expected = np.asarray([SIZE_RADIUS[name] for name in names])
        likelihood = np.exp(-0.5 * ((radius - expected) / self.size_sigma) ** 2) + 1e-12
        return float(likelihood[names.index(size)] / likelihood.sum())

    def _position_match(self, centre: tuple[float, float], radius: float, position: str) -> float:
        """P(``position``) among centre / left / right / top / bottom, from the box centre."""
        names: list[str | None] = [None, *POSITIONS]
        expected = np.asarray([expected_centre(name, radius) for name in names])
        distance2 = ((np.asarray(centre) - expected) ** 2).sum(axis=1)
        likelihood = np.exp(-0.5 * distance2 / self.position_sigma**2) + 1e-12
        return float(likelihood[names.index(position)] / likelihood.sum())


@functools.cache
def _fill_fraction(shape: str) -> float:
    """Share of its bounding box that ``shape`` covers (circle: pi / 4)."""
    return float(shape_coverage(shape, (0, 0, 256, 256), (256, 256), supersample=1).mean())


def _optional_keys(toy: ToyPrompt) -> list[str]:
    return [key for key, value in (("size", toy.size), ("position", toy.position)) if value is not None]


def _border_colour(pixels: np.ndarray) -> np.ndarray:
    """Median colour of a frame 1/16 of the side wide: the background estimate, (3,)."""
    height, width, _ = pixels.shape
    band = max(1, round(min(height, width) / 16))
    frame = np.concatenate([
        pixels[:band].reshape(-1, 3), pixels[-band:].reshape(-1, 3),
        pixels[:, :band].reshape(-1, 3), pixels[:, -band:].reshape(-1, 3),
    ])
    return np.median(frame, axis=0)


def _foreground(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(soft mask in [0, 1], hard mask) of pixels far from ``background``; None if flat.

    Distances are scaled by the image's own contrast (99th percentile), so the masks adapt
    to washed-out samples; the soft mask approximates the anti-aliased coverage.
    """
    distance = np.linalg.norm(pixels - background, axis=-1)
    contrast = float(np.percentile(distance, 99))
    if contrast < 0.1:
        return None
    soft = np.clip((distance - 0.25 * contrast) / (0.5 * contrast), 0.0, 1.0)
    hard = distance > 0.5 * contrast
    return soft, hard


def _robust_box(mask: np.ndarray) -> Box:
    """(x0, y0, x1, y1) in pixels around ``mask``, ignoring 1% outliers on each side."""
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    return float(x0), float(y0), float(x1) + 1.0, float(y1) + 1.0


_BOX_SCALES = (0.9, 1.0, 1.1, 1.2, 1.3)


def _fit_shapes(soft_mask: np.ndarray, box: Box) -> dict[str, tuple[float, Box]]:
    """Best (IoU, box) per shape, trying :data:`_BOX_SCALES` of ``box`` around its centre.

    The measured box clips thin tips (a diamond's corners are mostly background at 32x32),
    so each template may grow a little to find its best fit.
    """
    height, width = soft_mask.shape
    fits = {}
    for shape in SHAPES:
        candidates = []
        for scale in _BOX_SCALES:
            scaled = _scale_box(box, scale)
            candidates.append((_soft_iou(soft_mask, shape_coverage(shape, scaled, (width, height))), scaled))
        fits[shape] = max(candidates, key=lambda fit: fit[0])
    return fits


def _scale_box(box: Box, scale: float) -> Box:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * scale / 2, (box[3] - box[1]) * scale / 2
    return cx - hw, cy - hh, cx + hw, cy + hh


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0

"""The report's image grid: one row per model, one column per prompt, the prompts above.

``image_grid.png`` shows image 0 of the first prompts from every model (the same seed per
column, so the images differ by the model only), with a row of real data first when there is
one (:func:`spin_ray.eval.figures.write_report_figures`). PIL only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

IMAGE_GRID = "image_grid.png"
FONT_SIZE = 14
LINE_HEIGHT = FONT_SIZE + 4
"""Pixels per line of text in the image grid."""


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int,
              max_lines: int = 3) -> list[str]:
    """Word-wrap ``text`` into lines of at most ``width`` pixels (about 35 characters for a
    256 px cell at font size 14). At most ``max_lines`` lines: what does not fit is cut with
    an ellipsis on the last line, as is a single word wider than a line."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            candidate = word
        current = candidate
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1:])]
    return [_fit_text(draw, line, font, width) for line in lines]


def save_image_grid(
    out_dir: str | Path,
    images_by_model: Mapping[str, Sequence[Image.Image]],
    prompts: Sequence[str],
    cell_size: int = 256,
    label_width: int = 160,
    header_height: int = 40,
    filename: str = IMAGE_GRID,
    max_header_lines: int = 3,
) -> Path:
    """Save a grid: one row per entry of ``images_by_model`` in its order (labelled on the
    left; a reference row such as real data is just an entry, put first), one column per
    prompt; image j of every row belongs to prompt j (the models' from the same seed).

    The prompt is word-wrapped above its column onto up to ``max_header_lines`` lines; the
    header is ``header_height`` px or as tall as the longest wrapped prompt needs. Each
    image is scaled to fit a ``cell_size`` square (padded, not cropped). The PNG is
    ``label_width + len(prompts) * cell_size`` wide and ``header + len(rows) * cell_size`` high.
    """
    if not images_by_model or not prompts:
        raise ValueError("save_image_grid: expected at least one model and one prompt")
    for model, images in images_by_model.items():
        if len(images) != len(prompts):
            raise ValueError(f"save_image_grid: model {model!r} has {len(images)} images for {len(prompts)} prompts")
    font = ImageFont.load_default(size=FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [wrap_text(measure, prompt, font, cell_size - 8, max_header_lines) for prompt in prompts]
    header = max(header_height, max(len(lines) for lines in headers) * LINE_HEIGHT + 8)
    grid = Image.new("RGB", (label_width + len(prompts) * cell_size, header + len(images_by_model) * cell_size),
                     "white")
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(headers):
        for number, line in enumerate(lines):
            draw.text((label_width + column * cell_size + 4, 4 + number * LINE_HEIGHT), line, fill="black", font=font)
    for row, (model, images) in enumerate(images_by_model.items()):
        y = header + row * cell_size
        text = _fit_text(draw, model, font, label_width - 8)
        draw.text((4, y + (cell_size - FONT_SIZE) // 2), text, fill="black", font=font)
        for column, image in enumerate(images):
            cell = ImageOps.pad(image.convert("RGB"), (cell_size, cell_size), color="white")
            grid.paste(cell, (label_width + column * cell_size, y))
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

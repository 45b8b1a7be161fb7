"""Synthetic vision-language tasks for offline demos and tests (``data.source: synthetic:vl_count``).

Why this task: it needs the image to answer (the count is only in the pixels), the privileged
trace is a verifiable list of the coloured cells, and images of different sizes exercise the
processors' variable-resolution paths. Everything is generated from a seed - no files, no hub.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from opsd_mm.types import Example, Region

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
BACKGROUND = (245, 245, 245)
GRID_LINE = (120, 120, 120)


def draw_grid(cells: dict[tuple[int, int], str], rows: int, cols: int, cell_px: int) -> Image.Image:
    """An RGB grid ``rows x cols`` of ``cell_px`` pixel cells; ``cells`` maps (row, col) -> colour."""
    img = Image.new("RGB", (cols * cell_px, rows * cell_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (r, c), colour in cells.items():
        x0, y0 = c * cell_px, r * cell_px
        draw.rectangle([x0 + 1, y0 + 1, x0 + cell_px - 2, y0 + cell_px - 2], fill=COLOURS[colour])
    for r in range(rows + 1):
        draw.line([(0, r * cell_px), (cols * cell_px, r * cell_px)], fill=GRID_LINE)
    for c in range(cols + 1):
        draw.line([(c * cell_px, 0), (c * cell_px, rows * cell_px)], fill=GRID_LINE)
    return img


def cell_regions(cells: list[tuple[int, int]], cell_px: int, image: int = 0) -> tuple[Region, ...]:
    """Pixel boxes of grid cells (row, column) on image ``image`` (one region per cell)."""
    return tuple(
        Region(image, (c * cell_px, r * cell_px, (c + 1) * cell_px, (r + 1) * cell_px))
        for r, c in cells
    )


def make_vl_count_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` grid-counting examples: "How many <colour> cells are in <image>?".

    Grids are 3-6 rows x 3-6 columns of 16-24 px cells (so images are 48-144 px a side, small
    enough for tiny-model tests). ``privileged`` lists the target cells row by row, then the
    count; ``answer`` is the count as a string; ``regions`` are the target cells' boxes (for
    image views that zoom into or mark them). Same ``(n, seed)`` -> identical examples.
    """
    rng = random.Random(seed)
    names = list(COLOURS)
    examples = []
    for i in range(n):
        rows, cols = rng.randint(3, 6), rng.randint(3, 6)
        cell_px = rng.choice((16, 20, 24))
        cells = {
            (r, c): rng.choice(names)
            for r in range(rows)
            for c in range(cols)
            if rng.random() < 0.5
        }
        target = rng.choice(names)
        hits = sorted(rc for rc, colour in cells.items() if colour == target)
        listed = ", ".join(f"(row {r + 1}, column {c + 1})" for r, c in hits) or "none"
        trace = (
            f"The grid has {rows} rows and {cols} columns. Scanning row by row, the {target} "
            f"cells are at: {listed}. That is {len(hits)} {target} cell"
            f"{'' if len(hits) == 1 else 's'}, so the answer is \\boxed{{{len(hits)}}}."
        )
        examples.append(
            Example(
                id=f"vl_count-{seed}-{i}",
                question=(
                    f"<image>\nHow many {target} cells are in this grid? "
                    "Put the final answer in \\boxed{}."
                ),
                privileged=trace,
                answer=str(len(hits)),
                images=(draw_grid(cells, rows, cols, cell_px),),
                meta={"task": "vl_count", "rows": rows, "cols": cols, "colour": target},
                regions=cell_regions(hits, cell_px),
            )
        )
    return examples

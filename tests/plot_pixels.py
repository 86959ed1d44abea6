"""Read back what a PNG plot draws: that a report's plot shows the run's numbers, not just that an image exists.

The curve is found by its colour (matplotlib's first line colour by default), one mean pixel row per pixel column; its
columns are mapped linearly onto the series' steps (the first and last points are the curve's ends) and the series,
interpolated at those steps, must explain the rows linearly (R^2) with the sign a y axis has (higher value, higher
up). Nothing here calls the code that drew the plot: it reads pixels and the run's own metrics.jsonl.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np

C0 = (31, 119, 180)  # matplotlib's "C0", the first line of a plot


def png_images(page: str) -> dict[str, bytes]:
    """{alt text: PNG bytes} of every image embedded as a data: URI in an HTML page."""
    found = re.findall(r"<img [^>]*alt='([^']*)'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    return {alt: base64.b64decode(data) for alt, data in found}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)


def curve(png: bytes, colour: tuple[int, int, int] = C0, tol: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(columns, mean row) of the pixels drawn in ``colour`` (anti-aliased edges within ``tol`` of it)."""
    px = _pixels(png)
    mask = np.abs(px - np.array(colour)).sum(-1) <= tol
    cols = np.nonzero(mask.any(0))[0]
    rows = np.array([np.nonzero(mask[:, c])[0].mean() for c in cols])
    return cols, rows


def fit(png: bytes, points: list[tuple[float, float]]) -> float:
    """R^2 of the plotted curve's rows against the series ``points`` (step, value) mapped onto its columns; a curve
    that rises where the series falls scores its negative (a y axis puts higher values higher up)."""
    cols, rows = curve(png)
    steps, values = (np.array(v, dtype=float) for v in zip(*sorted(points)))
    at = steps[0] + (cols - cols[0]) / max(cols[-1] - cols[0], 1) * (steps[-1] - steps[0])
    expected = np.interp(at, steps, values)
    if np.ptp(expected) == 0 or np.ptp(rows) == 0:
        return 0.0
    slope, intercept = np.polyfit(expected, rows, 1)
    residual = rows - (slope * expected + intercept)
    r2 = 1.0 - (residual**2).sum() / ((rows - rows.mean()) ** 2).sum()
    return float(r2 if slope < 0 else -r2)


def bar_heights(png: bytes, colours: list[tuple[int, int, int]], tol: int = 30) -> list[int]:
    """Heights in pixels of the bars drawn in ``colours``, left to right (one bar: a run of adjacent columns)."""
    px = _pixels(png)
    mask = np.zeros(px.shape[:2], dtype=bool)
    for colour in colours:
        mask |= np.abs(px - np.array(colour)).sum(-1) <= tol
    cols = np.nonzero(mask.any(0))[0]
    heights, run = [], []
    for c in cols:
        if run and c != run[-1] + 1:
            heights.append(int(mask[:, run[len(run) // 2]].sum()))
            run = []
        run.append(c)
    if run:
        heights.append(int(mask[:, run[len(run) // 2]].sum()))
    return heights

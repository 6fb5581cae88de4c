"""Pictures for people: captioned image grids and reward curves, drawn with PIL alone (no plotting library)."""

from __future__ import annotations

import math
from typing import Collection, Sequence

from PIL import Image, ImageDraw, ImageFont

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _font():
    return ImageFont.load_default()


def image_grid(rows: Sequence[Sequence[Image.Image]], captions: Sequence[Sequence[str]] | None = None,
               row_titles: Sequence[str] | None = None, cell: int = 128) -> Image.Image:
    """Rows of images, each scaled to `cell` pixels, with an optional caption under each and a title per row."""
    font = _font()
    caption_h = 14 if captions else 0
    title_h = 16 if row_titles else 0
    cols = max(len(r) for r in rows)
    titles = [title[:120] for title in row_titles or ()]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([cols * (cell + 4) + 4] + [int(measure.textlength(title, font=font)) + 8 for title in titles])
    grid = Image.new("RGB", (width, len(rows) * (cell + caption_h + title_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    y = 4
    for r, row in enumerate(rows):
        if row_titles:
            draw.text((4, y), titles[r], fill="black", font=font)
            y += title_h
        for c, image in enumerate(row):
            x = 4 + c * (cell + 4)
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            if captions:
                draw.text((x, y + cell + 1), captions[r][c][:24], fill="black", font=font)
        y += cell + caption_h + 4
    return grid


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, x_label: str = "epoch",
              bands: dict[str, Sequence[float]] | None = None, size: tuple[int, int] = (640, 360),
              x_range: tuple[float, float] | None = None, squares: Collection[str] = ()) -> Image.Image:
    """Lines {name: (xs, ys)} on shared axes, with optional +-band {name: half-widths}, a legend and tick labels.
    `x_range` widens the x axis to at least that span (a run's epochs, so one point is not the whole plot); the
    series in `squares` get square markers (measured points apart from the others' dots)."""
    width, height = size
    legend_top, legend_rows = 24, math.ceil(len(series) / 2)  # two names a row, above the plot: never over a line
    left, right, top, bottom = 64, 16, legend_top + 14 * legend_rows + 6, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((left, 8), title, fill="black", font=font)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    if bands:
        for name, half in bands.items():
            xs, ys = series[name]
            points += [(x, y + h) for x, y, h in zip(xs, ys, half)] + [(x, y - h) for x, y, h in zip(xs, ys, half)]
    if not points:
        draw.text((left, height // 2), "no data yet", fill="gray", font=font)
        return image
    xs_all = [p[0] for p in points] + list(x_range or ())
    x_min, x_max = min(xs_all), max(xs_all)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_max = x_max if x_max > x_min else x_min + 1
    if y_max == y_min:  # a flat line sits mid-plot, with readable ticks around it
        y_min, y_max = y_min - 0.5, y_max + 0.5

    pad = 8  # points at the ends of the x axis are drawn whole, inside the frame

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + pad + (x - x_min) / (x_max - x_min) * (width - left - right - 2 * pad),
                height - bottom - (y - y_min) / (y_max - y_min) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in _ticks(y_min, y_max):
        _, py = to_px(x_min, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
    for x in _ticks(x_min, x_max, integers=all(float(x).is_integer() for x in xs_all)):
        px, _ = to_px(x, y_min)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 8, height - bottom + 6), f"{x:.4g}", fill="black", font=font)
    draw.text((width // 2 - 16, height - 14), x_label, fill="black", font=font)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        if bands and name in bands:
            for x, y, h in zip(xs, ys, bands[name]):
                draw.line([to_px(x, y - h), to_px(x, y + h)], fill=colour)
        pixels = [to_px(x, y) for x, y in zip(xs, ys)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        shape, r = (draw.rectangle, 4) if name in squares else (draw.ellipse, 3)
        for px, py in pixels:
            shape([px - r, py - r, px + r, py + r], fill=colour)
        x, y = left + 8 + (width - left - right) // 2 * (k % 2), legend_top + 14 * (k // 2)
        shape([x - r, y + 6 - r, x + r, y + 6 + r], fill=colour)
        draw.text((x + 8, y), name, fill=colour, font=font)
    return image


def _ticks(low: float, high: float, integers: bool = False) -> list[float]:
    """Three to seven round tick values (steps of 1, 2 or 5 x 10^k) inside [low, high]; whole numbers for epochs."""
    raw = (high - low) / 6
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    if integers:
        step = max(1, round(step))
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]

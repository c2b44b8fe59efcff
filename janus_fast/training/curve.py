"""The loss-curve PNG, drawn with PIL (already a dependency), written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint import atomic_write

SERIES = (("loss", (20, 20, 20)), ("text_loss", (40, 90, 220)), ("image_loss", (220, 60, 40)))


def _finite(value) -> bool:  # metrics.jsonl stores a non-finite value as null
    return isinstance(value, (int, float)) and math.isfinite(value)


def draw_loss_curve(history: list[dict], path, size=(800, 480)) -> Path | None:
    """Lines of loss, text_loss and image_loss against step; None when there is nothing to draw."""
    from PIL import Image, ImageDraw

    if not history:
        return None
    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    values = [r[k] for r in history for k, _ in SERIES if _finite(r.get(k))]
    if not values:
        return None
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    first, last = history[0]["step"], max(history[-1]["step"], history[0]["step"] + 1)
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    d.rectangle((left, top, w - right, h - bottom), outline=(160, 160, 160))

    def xy(step, value):
        x = left + (step - first) / (last - first) * (w - left - right)
        return x, top + (hi - value) / (hi - lo) * (h - top - bottom)

    for i in range(5):
        value = lo + (hi - lo) * i / 4
        d.text((4, xy(first, value)[1] - 6), f"{value:.3g}", fill=(90, 90, 90))
    d.text((left, h - bottom + 8), f"step {first}", fill=(90, 90, 90))
    d.text((w - right - 80, h - bottom + 8), f"step {last}", fill=(90, 90, 90))
    for n, (key, colour) in enumerate(SERIES):
        points = [xy(r["step"], r[key]) for r in history if _finite(r.get(key))]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        elif points:
            d.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        d.text((w - right - 90, top + 6 + 14 * n), key, fill=colour)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))

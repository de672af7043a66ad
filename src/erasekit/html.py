"""Self-contained HTML reports: images embedded as base64 PNG, no server, no external assets."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from erasekit.io import write_text_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right} th{background:#f5f5f7} td:first-child,th:first-child{text-align:left}
.good{color:#137333;font-weight:600} .bad{color:#b3261e;font-weight:600} .erased{background:#fff4e5}
.pair{display:flex;gap:1.5rem;flex-wrap:wrap} .pair figure{margin:0} figcaption{font-size:.85rem;color:#444;text-align:center}
img.grid{image-rendering:pixelated;border:1px solid #ccc} pre{background:#f5f5f7;padding:.8rem;overflow:auto;font-size:.8rem}
"""


def image_grid(images: Sequence[np.ndarray], cols: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile uint8 (H, W, 3) images into one PIL image, ``cols`` per row, upscaled by ``scale``."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def png_data_uri(img: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; floats are shown with one decimal as percentages when in [0, 1]."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{100 * v:.1f}%" if 0 <= v <= 1 else f"{v:.3g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{v if isinstance(v, Markup) else fmt(v)}</td>" for v in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Markup(str):
    """A string that :func:`table` inserts without escaping."""


def figure(img: Image.Image, caption: str, width: int | None = None) -> str:
    """An embedded image with a caption."""
    w = f' width="{width}"' if width else ""
    return f'<figure><img class="grid" src="{png_data_uri(img)}"{w} alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def config_block(config: dict[str, Any]) -> str:
    """The run's full config as pretty JSON."""
    return f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>"


def write_report(path: str | Path, title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page with ``sections`` = [(heading, html fragment)]."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{frag}" for h, frag in sections)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"
        f"{body}</body></html>"
    )
    write_text_atomic(path, page)
    return Path(path)

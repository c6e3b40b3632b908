"""A static HTML gallery of what ``ldmkit quickstart`` drew: every zoo model's inputs beside its samples,
its measured numbers and the commands that reproduce them.

The page is one self-contained ``index.html`` next to the PNGs it shows (relative links, no scripts or
styles from elsewhere: it opens offline). A short script marks the ``<body>`` with
``data-images-loaded="k/n"`` once the page has loaded, so a headless browser can tell that every image
decoded (``tests/test_cli.py`` checks it in Chromium and takes a screenshot).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GalleryEntry", "write_gallery"]


@dataclass
class GalleryEntry:
    """One section: a title, the image (a path relative to the page), what it shows, numbers, commands."""

    title: str
    image: str
    caption: str = ""
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_note: str = ""
    commands: list[str] = field(default_factory=list)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img { image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }
figcaption, .desc { color: #555; font-size: 0.95em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; }
"""

_CHECK = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def _section(e: GalleryEntry) -> str:
    esc = html.escape
    parts = [f"<section><h2>{esc(e.title)}</h2>"]
    if e.description:
        parts.append(f'<p class="desc">{esc(e.description)}</p>')
    parts.append(f'<figure><img src="{esc(e.image, quote=True)}" alt="{esc(e.title, quote=True)}">'
                 f"<figcaption>{esc(e.caption)}</figcaption></figure>")
    if e.metrics:
        rows = "".join(f'<tr><td>{esc(k)}</td><td class="num">{v:.4g}</td></tr>' for k, v in e.metrics.items())
        if e.metrics_note:
            parts.append(f'<p class="desc">{esc(e.metrics_note)}:</p>')
        parts.append(f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    if e.commands:
        parts.append("<pre>" + esc("\n".join(e.commands)) + "</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def write_gallery(path: str | Path, entries: list[GalleryEntry], *, title: str = "ldmkit quickstart",
                  intro: str = "") -> Path:
    """Write ``path`` (an ``index.html``) showing ``entries``; image paths are relative to its folder.

    Raises ``FileNotFoundError`` naming an entry whose image is not there: a gallery with a broken
    picture is a bug, not a page to ship.
    """
    path = Path(path)
    missing = [e.image for e in entries if not (path.parent / e.image).is_file()]
    if missing:
        raise FileNotFoundError(f"gallery {path}: images not found next to it: {', '.join(missing)}")
    body = "\n".join(_section(e) for e in entries)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            + (f"<p>{html.escape(intro)}</p>\n" if intro else "")
            + f"{body}\n<script>{_CHECK}</script>\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path

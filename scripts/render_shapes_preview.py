"""Render docs/images/shapes-preview.png: a grid of eval-split shapes-world scenes with their captions.

Usage: python scripts/render_shapes_preview.py [--out docs/images/shapes-preview.png]
"""

from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw

from ldmkit.data.shapes import ShapesWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/shapes-preview.png")
    parser.add_argument("--cols", type=int, default=6)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--scale", type=int, default=5, help="nearest-neighbour zoom of each 32x32 scene")
    args = parser.parse_args()

    world = ShapesWorld("eval", size=32, seed=0)
    tile, text_h, pad = 32 * args.scale, 40, 6
    sheet = Image.new("RGB", (args.cols * (tile + pad) + pad, args.rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(args.cols * args.rows):
        sample = world[k]
        x = pad + (k % args.cols) * (tile + pad)
        y = pad + (k // args.cols) * (tile + text_h + pad)
        sheet.paste(Image.fromarray(sample.image).resize((tile, tile), Image.NEAREST), (x, y))
        lines = textwrap.wrap(f"[{sample.label}] {sample.caption}", width=tile // 6)
        draw.multiline_text((x, y + tile + 2), "\n".join(lines), fill="black", spacing=1)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")


if __name__ == "__main__":
    main()

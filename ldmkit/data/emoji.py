"""Emoji: every single-code-point emoji of the Noto Color Emoji font, captioned with its Unicode name.

Source: Debian's ``fonts-noto-color-emoji`` (SIL Open Font License 1.1), file
``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf``. Each emoji is rendered from the font's only
bitmap strike (109 px, 136 x 128 pixels) on white, centred on a square canvas and resized to ``size``.

Which code points: those the font maps in its ``cmap`` table (read directly from the file, so no
rendering guesswork: a missing glyph would otherwise render as ``.notdef``), keeping an emoji when

- it is outside ASCII (the font maps ``0-9 # *`` only as the bases of keycap sequences),
- Python's Unicode database names it (``unicodedata.name``; emoji newer than that database are skipped,
  so the count grows slightly with the Python version: 1,361 with Python 3.11 / Unicode 14.0 and
  font 2.042),
- it is not a control, format, mark, separator, private-use or unassigned character (ZWJ, variation
  selectors, tag characters, the combining keycap), a regional-indicator letter or a skin-tone modifier
  (components of sequences, not emoji on their own).

Caption: the Unicode name, lowercased (``"grinning face"``). Label: none. Split: an emoji belongs to
``eval`` when its code point is a multiple of 10 (about 10 %), otherwise to ``train``; ``all`` is both.
The rule depends only on the code point, so it is stable across font and Python versions. Order:
ascending code point.

Rendering costs about 1 ms per emoji, so renders are cached in memory (per data set object) only.
"""

from __future__ import annotations

import os
import struct
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldmkit.data.base import Sample, SampleSequence

__all__ = ["EmojiDataset", "emoji_codepoints", "find_emoji_font", "DEFAULT_FONT_PATHS", "SPLITS"]

#: Where the font is looked for, in order, unless ``font_path=`` or ``$LDMKIT_EMOJI_FONT`` says otherwise.
DEFAULT_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
)
SPLITS = ("train", "eval", "all")
MISSING_FONT = "emoji data needs the Debian package fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji)"
_STRIKE_SIZE = 109  # the only bitmap size a CBDT Noto Color Emoji font has
_EXCLUDED_RANGES = ((0x1F1E6, 0x1F1FF), (0x1F3FB, 0x1F3FF))  # regional indicators, skin-tone modifiers


def find_emoji_font(font_path: str | os.PathLike[str] | None = None) -> Path:
    """The emoji font file: ``font_path``, else ``$LDMKIT_EMOJI_FONT``, else the first of
    :data:`DEFAULT_FONT_PATHS` that exists. Raises FileNotFoundError with the install hint otherwise."""
    explicit = font_path if font_path is not None else os.environ.get("LDMKIT_EMOJI_FONT") or None
    candidates = [Path(explicit)] if explicit is not None else [Path(p) for p in DEFAULT_FONT_PATHS]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"{MISSING_FONT}; no font file at {looked} (pass font_path= or set LDMKIT_EMOJI_FONT to use another)"
    )


def _read_cmap(path: Path) -> list[int]:
    """All code points mapped by the font's Unicode ``cmap`` subtable (format 12, else format 4)."""
    data = path.read_bytes()
    if len(data) < 12:
        raise ValueError(f"{path} is not a TrueType/OpenType font")
    (num_tables,) = struct.unpack_from(">H", data, 4)
    tables = {}
    for i in range(num_tables):
        tag, _checksum, offset, _length = struct.unpack_from(">4sIII", data, 12 + 16 * i)
        tables[tag] = offset
    if b"cmap" not in tables:
        raise ValueError(f"{path} has no cmap table")
    cmap = tables[b"cmap"]
    _version, num_subtables = struct.unpack_from(">HH", data, cmap)
    subtables: dict[int, int] = {}  # format -> offset, Unicode subtables only
    for i in range(num_subtables):
        platform, encoding, offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
        if (platform, encoding) in ((3, 10), (0, 4), (3, 1), (0, 3)):
            (fmt,) = struct.unpack_from(">H", data, cmap + offset)
            subtables.setdefault(fmt, cmap + offset)
    codepoints: set[int] = set()
    if 12 in subtables:  # segmented coverage: (start, end, glyph) groups
        base = subtables[12]
        (num_groups,) = struct.unpack_from(">I", data, base + 12)
        for g in range(num_groups):
            start, end, _glyph = struct.unpack_from(">III", data, base + 16 + 12 * g)
            codepoints.update(range(start, end + 1))
    elif 4 in subtables:  # BMP only: parallel arrays of segment ends and starts
        base = subtables[4]
        (seg_x2,) = struct.unpack_from(">H", data, base + 6)
        segs = seg_x2 // 2
        ends = struct.unpack_from(f">{segs}H", data, base + 14)
        starts = struct.unpack_from(f">{segs}H", data, base + 16 + seg_x2)
        for start, end in zip(starts, ends):
            if start != 0xFFFF:
                codepoints.update(range(start, end + 1))
    else:
        raise ValueError(f"{path} has no Unicode cmap subtable of format 4 or 12")
    return sorted(codepoints)


def _is_single_emoji(cp: int) -> bool:
    char = chr(cp)
    return (
        cp >= 0x80
        and bool(unicodedata.name(char, ""))
        and unicodedata.category(char)[0] not in "CMZ"
        and not any(lo <= cp <= hi for lo, hi in _EXCLUDED_RANGES)
    )


@lru_cache(maxsize=4)
def _font_codepoints(path: str, mtime_ns: int) -> tuple[int, ...]:
    return tuple(cp for cp in _read_cmap(Path(path)) if _is_single_emoji(cp))


def emoji_codepoints(font_path: str | os.PathLike[str] | None = None, split: str = "all") -> list[int]:
    """The code points of ``split`` (see the module docstring for the rules), ascending."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    path = find_emoji_font(font_path)
    everything = _font_codepoints(str(path.resolve()), path.stat().st_mtime_ns)
    if split == "all":
        return list(everything)
    want_eval = split == "eval"
    return [cp for cp in everything if (cp % 10 == 0) == want_eval]


class EmojiDataset(SampleSequence):
    """Noto Color Emoji renders on white, ``size x size`` RGB, captioned with their Unicode names.

    Args:
        split: ``"train"``, ``"eval"`` (code points that are multiples of 10) or ``"all"``.
        size: output side in pixels (e.g. 32 or 64), 8..512.
        font_path: the font file; default ``$LDMKIT_EMOJI_FONT`` or the distribution's location.

    Each :class:`Sample` has ``caption`` and ``meta = {"codepoint": "U+1F600", "char": "😀", "index": i}``.
    """

    def __init__(
        self, split: str = "train", size: int = 32, *, font_path: str | os.PathLike[str] | None = None
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 512:
            raise ValueError(f"size must be an integer in 8..512; got {size!r}")
        self.split = split
        self.size = size
        self.font_path = find_emoji_font(font_path)
        self.codepoints = emoji_codepoints(self.font_path, split)
        self._font: ImageFont.FreeTypeFont | None = None
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.codepoints)

    _noun = "emoji"

    def _sample(self, index: int) -> Sample:
        cp = self.codepoints[index]
        char = chr(cp)
        return Sample(
            image=self._render(cp).copy(),
            caption=unicodedata.name(char).lower(),
            meta={"source": "emoji", "codepoint": f"U+{cp:04X}", "char": char, "index": index},
        )

    def _render(self, cp: int) -> np.ndarray:
        if cp not in self._cache:
            if self._font is None:
                self._font = ImageFont.truetype(str(self.font_path), size=_STRIKE_SIZE)
            left, top, right, bottom = (int(v) for v in self._font.getbbox(chr(cp)))
            w, h = max(right - left, 1), max(bottom - top, 1)
            glyph = Image.new("RGBA", (w, h), (255, 255, 255, 0))
            ImageDraw.Draw(glyph).text((-left, -top), chr(cp), font=self._font, embedded_color=True)
            side = max(w, h)
            canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
            canvas.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
            image = canvas.convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)
            self._cache[cp] = np.asarray(image, dtype=np.uint8)
        return self._cache[cp]

    def __getstate__(self) -> dict[str, Any]:  # the FreeType handle does not pickle (DataLoader workers)
        state = self.__dict__.copy()
        state["_font"] = None
        return state

    def __repr__(self) -> str:
        return f"EmojiDataset(split={self.split!r}, size={self.size}, n={len(self)})"

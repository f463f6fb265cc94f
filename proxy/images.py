"""What an image or audio input costs in tokens, from its header alone.

Pure: no pixels are decoded and nothing is fetched. Image dimensions are read from the
header of a base64 data URL (PNG, JPEG, GIF, WebP); a remote URL cannot be sized without
fetching it, so its cost is the largest the model bills for one image, and the caller
labels the estimate as assumed.

The formulas are OpenAI's "Images and vision" guide, section "Calculating costs"
(https://platform.openai.com/docs/guides/images-vision#calculating-costs):

- tile models (gpt-4o family and others): scale to fit 2048x2048, then scale down so the
  shortest side is at most 768, count 512px tiles; base + per-tile tokens. `detail: low`
  is the base alone.
- patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano): count 32px patches; above
  1536 the image is scaled to fit 1536 patches; times a per-model multiplier.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass

__all__ = [
    "ImageCost",
    "audio_seconds",
    "image_size",
    "image_tokens",
    "image_tokens_for_size",
    "largest_image_tokens",
]


@dataclass(frozen=True, slots=True)
class ImageCost:
    """How a model family bills images: by 512px tiles (base + per tile) or 32px patches."""

    base: int = 0
    tile: int = 0
    patch_multiplier: float | None = None

    @property
    def patches(self) -> bool:
        return self.patch_multiplier is not None


# Checked in order, longest prefix first where they overlap (gpt-4o-mini before gpt-4o).
# Tile figures from the vision guide's table. Patch multipliers: the guide lists gpt-4.1-mini
# 1.62, gpt-4.1-nano 2.46, o4-mini 1.72. For gpt-5-mini and gpt-5-nano the guide repeats
# 1.62 and 2.46, but the calculator on OpenAI's pricing page (https://openai.com/api/pricing/)
# uses 1.2 and 1.5, and what OpenAI bills agrees with the calculator: a real gpt-5-nano
# capture (tests/fixtures/openai-extra/chat-multimodal.yaml, a 2560px image) reports 2245
# prompt tokens, about 1500 patches x 1.5; at 2.46 it would be ~3780.
_FAMILIES: tuple[tuple[str, ImageCost], ...] = (
    ("gpt-4.1-mini", ImageCost(patch_multiplier=1.62)),
    ("gpt-4.1-nano", ImageCost(patch_multiplier=2.46)),
    ("o4-mini", ImageCost(patch_multiplier=1.72)),
    ("codex-mini", ImageCost(patch_multiplier=1.72)),
    ("gpt-5-mini", ImageCost(patch_multiplier=1.2)),
    ("gpt-5-nano", ImageCost(patch_multiplier=1.5)),
    ("gpt-4o-mini", ImageCost(base=2833, tile=5667)),
    ("computer-use-preview", ImageCost(base=65, tile=129)),
    ("gpt-5", ImageCost(base=70, tile=140)),
    ("o1", ImageCost(base=75, tile=150)),
    ("o3", ImageCost(base=75, tile=150)),
)
# gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo and anything unknown: the guide's reference family.
_DEFAULT = ImageCost(base=85, tile=170)

MAX_PATCHES = 1536
PATCH = 32
TILE = 512


def cost_for(model: str) -> ImageCost:
    for prefix, cost in _FAMILIES:
        if model.startswith(prefix):
            return cost
    return _DEFAULT


def image_tokens_for_size(model: str, width: int, height: int, detail: str | None) -> int:
    """Tokens OpenAI bills for one width x height image sent to `model` at `detail`."""
    fam = cost_for(model)
    if fam.patches:
        # The guide gives no `detail` for patch models; measured, low changes nothing there.
        assert fam.patch_multiplier is not None
        return math.ceil(_patches(width, height) * fam.patch_multiplier)
    if detail == "low":
        return fam.base
    return fam.base + fam.tile * _tiles(width, height)


def largest_image_tokens(model: str, detail: str | None) -> int:
    """The most one image can cost on `model`: the estimate for an image of unknown size.

    Patch models are capped at 1536 patches; tile models at 2x4 tiles (scaled to fit 2048,
    shortest side 768, an image at least 768 x 1537 covers eight 512px tiles)."""
    fam = cost_for(model)
    if fam.patches:
        assert fam.patch_multiplier is not None
        return math.ceil(MAX_PATCHES * fam.patch_multiplier)
    if detail == "low":
        return fam.base
    return fam.base + fam.tile * 8


def _tiles(width: int, height: int) -> int:
    w, h = float(width), float(height)
    if w <= 0 or h <= 0:
        return 0
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / TILE) * math.ceil(h / TILE)


def _patches(width: int, height: int) -> int:
    if width <= 0 or height <= 0:
        return 0
    raw = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    if raw <= MAX_PATCHES:
        return raw
    # The guide's steps: shrink so the area fits 1536 patches, then shrink again so the
    # width is a whole number of patches, and count the patches that cover the result.
    shrink = math.sqrt(PATCH * PATCH * MAX_PATCHES / (width * height))
    w, h = width * shrink, height * shrink
    w_patches = w / PATCH
    shrink2 = math.floor(w_patches) / w_patches if w_patches >= 1 else 1.0
    w, h = w * shrink2, h * shrink2
    return min(MAX_PATCHES, math.ceil(w / PATCH) * math.ceil(h / PATCH))


# ---- reading sizes from headers


def _data_url_bytes(url: str, limit: int | None) -> bytes | None:
    """The first `limit` decoded bytes of a base64 data URL (all of it with None)."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        return None
    if limit is not None:
        # 4 base64 characters per 3 bytes; a whole number of quanta decodes on its own.
        payload = payload[: (limit + 2) // 3 * 4]
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return None


def image_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a data-URL image from its header; None for a remote URL or an
    image this cannot read (unknown format, truncated, not base64)."""
    data = _data_url_bytes(url, 64)
    if data is None:
        return None
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_size(data)
    if data.startswith(b"\xff\xd8"):
        whole = _data_url_bytes(url, None)  # SOF can sit behind EXIF: read to it
        return None if whole is None else _jpeg_size(whole)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF and i + 9 <= len(data):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def image_tokens(model: str, url: object, detail: object) -> tuple[int, bool]:
    """(tokens, assumed): the image's cost on `model`; assumed is True when its size could
    not be read (a remote URL) and the largest billed image was counted instead."""
    d = detail if isinstance(detail, str) else None
    size = image_size(url) if isinstance(url, str) else None
    if size is None:
        return largest_image_tokens(model, d), True
    return image_tokens_for_size(model, size[0], size[1], d), False


def audio_seconds(data: object, fmt: object) -> float | None:
    """Duration of base64 input audio: exact for WAV (from its header); for compressed
    formats from its size at 128 kbit/s (typical mp3); None if unreadable."""
    if not isinstance(data, str):
        return None
    try:
        raw = base64.b64decode(data[:64], validate=False)
    except (binascii.Error, ValueError):
        return None
    size = len(data) * 3 // 4
    if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE" and len(raw) >= 36:
        byte_rate = int.from_bytes(raw[28:32], "little")
        if byte_rate > 0:
            return max(0.0, (size - 44) / byte_rate)
    return size / 16_000

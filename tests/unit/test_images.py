"""proxy.images: image sizes read from data-URL headers (no pixels decoded), and audio length."""

from __future__ import annotations

import base64
import struct

from proxy import images


def _data(kind: str, raw: bytes) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def test_png_gif_webp_and_jpeg_headers() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", 640, 480) + b"\x08\x02\x00\x00\x00" + b"\x00" * 100
    assert images.image_size(_data("png", png)) == (640, 480)
    gif = b"GIF89a" + struct.pack("<HH", 300, 200) + b"\x00" * 20
    assert images.image_size(_data("gif", gif)) == (300, 200)
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x0a\x00\x00\x00" + b"\x00\x00\x00\x00" + (1999).to_bytes(3, "little") + (999).to_bytes(3, "little")
    assert images.image_size(_data("webp", vp8x)) == (2000, 1000)
    bits = (800 - 1) | ((600 - 1) << 14)
    vp8l = b"RIFF\x00\x00\x00\x00WEBPVP8L" + b"\x00\x00\x00\x00" + b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 8
    assert images.image_size(_data("webp", vp8l)) == (800, 600)
    vp8 = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 7 + b"\x9d\x01\x2a" + struct.pack("<HH", 1024, 768) + b"\x00" * 4
    assert images.image_size(_data("webp", vp8)) == (1024, 768)
    # JPEG: an APP1 (EXIF) segment larger than the first 64 bytes before the SOF0 frame.
    app1 = b"\xff\xe1" + (2 + 300).to_bytes(2, "big") + b"\x00" * 300
    sof0 = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + struct.pack(">HH", 1080, 1920) + b"\x03" + b"\x00" * 9
    jpeg = b"\xff\xd8" + app1 + b"\xff\xc4\x00\x04\x00\x00" + sof0 + b"\xff\xd9"
    assert images.image_size(_data("jpeg", jpeg)) == (1920, 1080)


def test_unreadable_and_remote_images_have_no_size() -> None:
    assert images.image_size("https://example.com/cat.png") is None
    assert images.image_size("data:image/png;base64,AAAA") is None
    assert images.image_size("data:image/png;base64,!!!not base64") is None
    assert images.image_size("data:image/svg+xml,<svg/>") is None
    assert images.image_size(_data("jpeg", b"\xff\xd8\xff")) is None
    tokens, assumed = images.image_tokens("gpt-5-nano", "https://example.com/cat.png", None)
    assert assumed and tokens == images.largest_image_tokens("gpt-5-nano", None) == 2304


def test_wav_duration_from_its_header() -> None:
    rate, seconds = 8000, 2
    pcm = b"\x80" * (rate * seconds)
    header = (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
              + b"data" + struct.pack("<I", len(pcm)))
    wav = base64.b64encode(header + pcm).decode()
    assert abs((images.audio_seconds(wav, "wav") or 0) - seconds) < 0.01
    assert images.audio_seconds(None, "wav") is None

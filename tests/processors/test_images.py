"""Image loading: every accepted source form, RGB conversion, and every bad-image case under both
policies (``raise`` names the example and file; ``skip`` returns None and reports the error)."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

from opsd_mm.processors.images import BadImageError, load_example_images, load_image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no pixel data: opening it is
    cheap, decoding it would fail, so a size rejection proves the check ran before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def cfg(policy: str = "raise", max_image_pixels: int = 1_000_000) -> SimpleNamespace:
    return SimpleNamespace(bad_image_policy=policy, max_image_pixels=max_image_pixels)


RED = Image.new("RGB", (30, 20), (255, 0, 0))


# ----------------------------------------------------------------------------- good sources


def test_sources(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(RED))
    data = png_bytes(RED)
    sources = [
        RED,
        data,
        {"bytes": data, "path": "ignored-when-bytes-present.png"},
        {"bytes": None, "path": "imgs/a.png"},
        "imgs/a.png",
        tmp_path / "imgs" / "a.png",
        f"file://{tmp_path}/imgs/a.png",
    ]
    images = load_example_images("ex-1", sources, tmp_path, cfg())
    assert images is not None and len(images) == len(sources)
    for img in images:
        assert img.mode == "RGB" and img.size == (30, 20)
        assert img.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "L", "CMYK", "I;16", "I", "F", "1"])
def test_modes_become_rgb(mode):
    img = Image.new("RGBA", (8, 6), (10, 20, 30, 0)).convert(mode)
    out = load_image(img, "ex-mode")
    assert out.mode == "RGB" and out.size == (8, 6)


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(img, "ex").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert load_image(png_bytes(pal), "ex").getpixel((0, 0)) == (255, 255, 255)


def test_empty_list_is_fine():
    assert load_example_images("ex", [], None, cfg()) == []
    assert load_example_images("ex", None, None, cfg()) == []


# ----------------------------------------------------------------------------- bad images


def truncated_png() -> bytes:
    noisy = Image.effect_noise((64, 64), 50).convert("RGB")
    data = png_bytes(noisy)
    return data[: len(data) // 2]


BAD_CASES = {
    "missing file": ("no/such.png", "file not found", "no/such.png"),
    "missing dict path": ({"bytes": None, "path": "gone.jpg"}, "file not found", "gone.jpg"),
    "corrupt bytes": (b"definitely not an image", "cannot identify image", "<bytes: 23 B>"),
    "truncated data": (truncated_png(), "corrupt image data", "<bytes:"),
    "empty bytes": (b"", "empty bytes", "<bytes: 0 B>"),
    "empty dict": ({"bytes": None, "path": None}, "neither bytes nor path", "<empty image dict>"),
    "zero-size image": (Image.new("RGB", (0, 5)), "zero-size", "<PIL RGB 0x5>"),
    "too many pixels (header)": (
        png_header_only(2000, 2000),
        "4,000,000 pixels exceeds processor.max_image_pixels=1,000,000",
        "<bytes:",
    ),
    "decompression bomb": (png_header_only(100_000, 100_000), "decompression bomb", "<bytes:"),
    "too many pixels (PIL object)": (
        Image.new("1", (2000, 1000)),
        "exceeds processor.max_image_pixels",
        "<PIL 1 2000x1000>",
    ),
    "extreme aspect ratio": (Image.new("RGB", (402, 2)), "aspect ratio 201:1", "<PIL RGB 402x2>"),
    "url": ("https://example.com/a.png", "URLs are not fetched", "https://example.com/a.png"),
    "unsupported type": (12345, "unsupported image source type", "<int>"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_image_raise_policy(case, tmp_path):
    src, reason, source = BAD_CASES[case]
    with pytest.raises(BadImageError) as info:
        load_example_images("ex-bad-7", [RED, src], tmp_path, cfg("raise"))
    err = info.value
    assert err.example_id == "ex-bad-7" and reason in err.reason and source in err.source
    assert "ex-bad-7" in str(err) and source in str(err)  # names the example and the file


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_image_skip_policy(case, tmp_path, caplog):
    src, reason, source = BAD_CASES[case]
    seen: list[BadImageError] = []
    assert load_example_images("ex-bad-8", [RED, src], tmp_path, cfg("skip"), seen.append) is None
    assert len(seen) == 1 and seen[0].example_id == "ex-bad-8" and reason in seen[0].reason
    # Without a callback the skip is logged with the example id.
    with caplog.at_level(logging.WARNING, logger="opsd_mm.processors.images"):
        assert load_example_images("ex-bad-9", [src], tmp_path, cfg("skip")) is None
    assert "ex-bad-9" in caplog.text and source in caplog.text


def test_size_check_happens_before_decoding(monkeypatch):
    def no_decode(self):
        raise AssertionError("decoded an image that the header already rules out")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(BadImageError, match="exceeds processor.max_image_pixels"):
        load_image(png_header_only(5000, 5000), "ex-bomb", max_image_pixels=1_000_000)

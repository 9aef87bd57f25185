"""Decoding untrusted image bytes: allowed formats only (EPS never reaches Ghostscript), a pixel limit
checked before decoding, and decoding concurrency bounded by a memory budget."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib

import pytest
from PIL import EpsImagePlugin, Image

from realsyn.dedup import perceptual_hash
from realsyn.export import normalize_image
from realsyn.image_db import ImageFetcher, UndecodableImageError, build_image_table, probe_image
from realsyn.image_decode import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_CEILING,
    DecodeBudget,
    decode_budget,
    open_image,
    set_decode_budget,
)
from realsyn.readers import Document
from realsyn.stats import StepStats

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
PS = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _encode(fmt: str, size=(40, 30), mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120 if mode in ("L", "P") else (10, 200, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds no pixel data: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


@pytest.fixture
def ghostscript_spy(monkeypatch):
    """Fails the test if Pillow's EPS plug-in parses the bytes or calls Ghostscript."""
    calls = []

    def no_ghostscript(*args, **kwargs):
        calls.append("Ghostscript")
        raise AssertionError("Ghostscript was invoked")

    original_open = EpsImagePlugin.EpsImageFile._open

    def spy_open(self):
        calls.append("EpsImageFile._open")
        return original_open(self)

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy_open)
    return calls


def test_the_eps_input_is_real_eps_to_an_unrestricted_pillow(ghostscript_spy):
    with Image.open(io.BytesIO(EPS)) as im:
        assert im.format == "EPS" and im.size == (10, 10)
    assert ghostscript_spy == ["EpsImageFile._open"]  # the spy sees an unrestricted open


@pytest.mark.parametrize("data", [EPS, PS], ids=["eps", "ps"])
def test_eps_and_ps_never_reach_ghostscript(data, ghostscript_spy):
    with pytest.raises(UndecodableImageError, match="UnidentifiedImageError"):
        probe_image(data)
    with pytest.raises(UndecodableImageError):
        normalize_image(data, "eps")  # export re-encodes formats it does not pass through
    with pytest.raises(ValueError, match="undecodable image"):
        perceptual_hash(data)
    table = build_image_table([Document("d", [data], [None], {})], "s", ImageFetcher(), StepStats("i"), workers=1)
    assert table.column("status").to_pylist() == ["undecodable"]
    assert ghostscript_spy == []


def test_the_embedder_opens_through_the_same_gate(ghostscript_spy):
    pytest.importorskip("open_clip")
    from realsyn.embedding.open_clip_embedder import OpenClipEmbedder

    stats = StepStats("e")
    vectors = OpenClipEmbedder(model_name="RealSyn-Tiny", pretrained=None, device="cpu").embed_images(
        [EPS, _encode("PNG", (64, 64))], stats
    )
    assert not vectors[0].any() and vectors[1].any()
    assert stats.dropped == {"undecodable": 1}
    assert ghostscript_spy == []


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA", "SGI", "IM"])
def test_formats_outside_the_list_are_not_decoded(fmt):
    data = _encode(fmt, (32, 32))
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == fmt  # Pillow alone would decode it
    with pytest.raises(UndecodableImageError, match="UnidentifiedImageError"):
        probe_image(data)


@pytest.mark.parametrize(
    "fmt, kwargs, expected",
    [
        ("JPEG", {}, "jpeg"),
        ("PNG", {}, "png"),
        ("WEBP", {}, "webp"),
        ("GIF", {}, "gif"),
        ("BMP", {}, "bmp"),
        ("TIFF", {}, "tiff"),
    ],
)
def test_allowed_formats_decode(fmt, kwargs, expected):
    assert probe_image(_encode(fmt, (40, 30), **kwargs)) == (40, 30, expected)


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("P", (20, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert probe_image(buf.getvalue()) == (20, 10, "gif")


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    assert DEFAULT_MAX_PIXELS == 40_000_000 < Image.MAX_IMAGE_PIXELS
    over = _png_header_only(8000, 5001)  # 40,008,000 pixels, no pixel data
    with pytest.raises(UndecodableImageError, match=r"too_many_pixels: 8000x5001 > 40000000 pixels"):
        probe_image(over)
    under = _png_header_only(8000, 5000)  # exactly the limit: passes the header check, then fails to decode
    with pytest.raises(UndecodableImageError) as info:
        probe_image(under)
    assert "too_many_pixels" not in str(info.value)
    # configurable per call (ingest passes its max_image_pixels)
    png = _encode("PNG", (120, 80))
    assert probe_image(png, max_pixels=120 * 80) == (120, 80, "png")
    with pytest.raises(UndecodableImageError, match="too_many_pixels"):
        probe_image(png, max_pixels=120 * 80 - 1)


def test_ingest_uses_the_fetchers_pixel_limit():
    png = _encode("PNG", (120, 80))
    stats = StepStats("i")
    rows = build_image_table([Document("d", [png], [None], {})], "s", ImageFetcher(max_pixels=120 * 80 - 1), stats, workers=1).to_pylist()
    assert rows[0]["status"] == "undecodable" and rows[0]["error"].startswith("too_many_pixels: 120x80")
    assert stats.counts["images_undecodable"] == 1


def test_later_decoders_enforce_the_ceiling():
    huge = _png_header_only(9500, 9500)  # 90.25M pixels: over Pillow's default, which later steps enforce
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(UndecodableImageError, match="too_many_pixels"):
            normalize_image(huge, "png-as-other")
        with pytest.raises(ValueError, match="too_many_pixels"):
            perceptual_hash(huge)
    assert MAX_PIXELS_CEILING == 89_478_485


def test_ingest_config_limits_the_pixel_limit():
    from pydantic import ValidationError

    from assets.configs import IngestConfig

    assert IngestConfig(max_image_pixels=MAX_PIXELS_CEILING).max_image_pixels == MAX_PIXELS_CEILING
    with pytest.raises(ValidationError):
        IngestConfig(max_image_pixels=MAX_PIXELS_CEILING + 1)
    with pytest.raises(ValidationError):
        IngestConfig(max_image_pixels=0)


def test_decode_budget_blocks_until_memory_is_free_and_runs_an_oversized_image_alone():
    budget = DecodeBudget(100)
    release_a = threading.Event()
    b_got = threading.Event()
    a_in = threading.Event()

    def a():
        with budget.reserve(60):
            a_in.set()
            release_a.wait(5)

    def b():
        with budget.reserve(60):
            b_got.set()

    ta = threading.Thread(target=a)
    ta.start()
    assert a_in.wait(5)
    tb = threading.Thread(target=b)
    tb.start()
    assert not b_got.wait(0.3)  # 60 + 60 > 100: b waits
    assert budget.in_use == 60
    release_a.set()
    assert b_got.wait(5)
    ta.join(5)
    tb.join(5)
    assert (budget.in_use, budget.peak) == (0, 60)
    with budget.reserve(250):  # larger than the whole budget: runs when nothing else is reserved
        assert budget.in_use == 250
    assert budget.in_use == 0
    with pytest.raises(ValueError):
        DecodeBudget(0)


def test_concurrent_decodes_stay_within_the_budget():
    png = _encode("PNG", (100, 100))
    per_image = 100 * 100 * 4
    saved = decode_budget()
    budget = set_decode_budget(3 * per_image)
    try:
        errors = []

        def work():
            try:
                for _ in range(20):
                    assert probe_image(png) == (100, 100, "png")
            except Exception as e:  # pragma: no cover - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert per_image <= budget.peak <= 3 * per_image
        assert budget.in_use == 0
    finally:
        set_decode_budget(saved.budget)


def test_open_image_reserves_by_size_while_the_caller_decodes():
    saved = decode_budget()
    budget = set_decode_budget(10 << 20)
    try:
        with open_image(_encode("PNG", (50, 20))) as im:
            assert budget.in_use == 50 * 20 * 4
            im.load()
        with open_image(_encode("PNG", (50, 20)), bytes_per_pixel=8):
            assert budget.in_use == 50 * 20 * 8
        assert budget.in_use == 0
    finally:
        set_decode_budget(saved.budget)

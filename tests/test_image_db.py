"""Image fetching (against a local HTTP server on 127.0.0.1 only), probing, image and sentence tables."""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from PIL import Image

from realsyn.fetch_policy import FetchPolicy
from realsyn.image_db import (
    IMAGE_DB_SCHEMA,
    SENTENCE_DB_SCHEMA,
    FetchError,
    ImageFetcher,
    UndecodableImageError,
    build_image_table,
    build_sentence_table,
    probe_image,
)
from realsyn.readers import Document
from realsyn.stats import StepStats
from realsyn.text.sentences import SentenceSplitter
from tests.s3_server import moto_s3


def _encode(size, fmt, mode="RGB", color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format=fmt)
    return buf.getvalue()


PNG = _encode((120, 80), "PNG")
JPEG = _encode((64, 200), "JPEG")
WEBP = _encode((33, 17), "WEBP")


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body=b"", length=True):
        self.send_response(code)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.hits[self.path] += 1
        if self.path == "/img.png":
            self._send(200, PNG)
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-unsized":  # no Content-Length: the cap must apply while streaming
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"y" * 500)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        elif self.path == "/drip":  # every read is quick, the whole body is not
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/flaky" and self.hits[self.path] == 1:
            self._send(503, b"busy")
        elif self.path == "/flaky":
            self._send(200, JPEG)
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


LOOPBACK = FetchPolicy(allowed_networks=["127.0.0.1/32"])  # the test server's one address, opted in


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reason(fetcher, ref) -> str:
    with pytest.raises(FetchError) as info:
        fetcher.fetch(ref)
    return info.value.reason


def test_fetch_http(server):
    fetcher = ImageFetcher(timeout_s=0.5, max_bytes=1000, retries=0, policy=LOOPBACK)
    assert fetcher.fetch(f"{server}/img.png") == PNG
    assert _reason(fetcher, f"{server}/missing.jpg") == "http_404"
    assert _reason(fetcher, f"{server}/big") == "too_large"
    assert _reason(fetcher, f"{server}/big-unsized") == "too_large"
    started = time.monotonic()
    assert _reason(fetcher, f"{server}/slow") == "timeout"
    assert time.monotonic() - started < 1.4
    assert _reason(fetcher, f"http://127.0.0.1:{_closed_port()}/x.jpg") == "unreachable"


def test_fetch_http_total_deadline_for_slow_drip(server):
    fetcher = ImageFetcher(timeout_s=0.5, max_bytes=1000, retries=0, total_timeout_s=0.6, policy=LOOPBACK)
    started = time.monotonic()
    assert _reason(fetcher, f"{server}/drip") == "timeout"
    assert time.monotonic() - started < 1.5


def test_fetch_http_retries_transient_errors_only(server):
    _Handler.hits.clear()
    assert _reason(ImageFetcher(retries=0, policy=LOOPBACK), f"{server}/flaky") == "http_503"
    _Handler.hits.clear()
    assert ImageFetcher(retries=1, policy=LOOPBACK).fetch(f"{server}/flaky") == JPEG
    assert _Handler.hits["/flaky"] == 2
    assert _reason(ImageFetcher(retries=3, policy=LOOPBACK), f"{server}/gone") == "http_404"
    assert _Handler.hits["/gone"] == 1  # a 404 is not retried


def test_fetch_inline_local_and_data_uri(tmp_path):
    fetcher = ImageFetcher(max_bytes=1000, policy=FetchPolicy.for_input(str(tmp_path)))
    assert fetcher.fetch(PNG) == PNG
    assert fetcher.fetch(bytearray(PNG)) == PNG
    assert _reason(fetcher, b"x" * 1001) == "too_large"
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert fetcher.fetch(str(path)) == PNG
    assert fetcher.fetch(f"file://{path}") == PNG
    (tmp_path / "big.bin").write_bytes(b"0" * 1001)
    assert _reason(fetcher, str(tmp_path / "big.bin")) == "too_large"
    assert _reason(fetcher, str(tmp_path / "missing.png")) == "not_found"
    assert _reason(fetcher, str(tmp_path)) == "not_found"  # a directory
    assert fetcher.fetch("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    assert _reason(fetcher, "data:image/png;base64,@@@") == "bad_data_uri"
    assert _reason(fetcher, "data:text/plain,hello") == "bad_data_uri"
    assert _reason(fetcher, "ftp://127.0.0.1/a.png") == "refused_scheme"
    assert _reason(fetcher, "   ") == "no_reference"


def test_fetch_s3():
    with moto_s3(("imgs",)):
        import s3fs

        s3fs.S3FileSystem().pipe_file("imgs/a/b.png", PNG)
        fetcher = ImageFetcher(policy=FetchPolicy.for_input("s3://imgs/a"))
        assert fetcher.fetch("s3://imgs/a/b.png") == PNG
        assert _reason(fetcher, "s3://imgs/a/missing.png") == "not_found"


@pytest.mark.parametrize("data, expected", [(PNG, (120, 80, "png")), (JPEG, (64, 200, "jpeg")), (WEBP, (33, 17, "webp"))])
def test_probe_image(data, expected):
    assert probe_image(data) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", JPEG[: len(JPEG) // 2], PNG[:60], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png", "png-magic-only"],
)
def test_probe_image_rejects_undecodable(data):
    with pytest.raises(UndecodableImageError):
        probe_image(data)


def test_probe_image_guards_against_decompression_bombs():
    assert probe_image(PNG, max_pixels=120 * 80) == (120, 80, "png")
    with pytest.raises(UndecodableImageError, match="too_many_pixels"):
        probe_image(PNG, max_pixels=120 * 80 - 1)


def test_build_image_table(server, tmp_path):
    local = tmp_path / "local.webp"
    local.write_bytes(WEBP)
    docs = [
        Document("d1", [None, PNG, None, f"{server}/img.png"], ["Intro.", None, "Middle.", None], {}),
        Document("d2", [], [], {}),
        Document("d3", [b"garbage", f"{server}/missing.jpg", str(local)], [None, None, None], {}),
    ]
    expected = [
        ("part-0/d1#1", "d1", 1, "inline", "ok", 120, 80, "png", hashlib.sha256(PNG).hexdigest()),
        ("part-0/d1#3", "d1", 3, f"{server}/img.png", "ok", 120, 80, "png", hashlib.sha256(PNG).hexdigest()),
        ("part-0/d3#0", "d3", 0, "inline", "undecodable", None, None, None, hashlib.sha256(b"garbage").hexdigest()),
        ("part-0/d3#1", "d3", 1, f"{server}/missing.jpg", "fetch_failed", None, None, None, None),
        ("part-0/d3#2", "d3", 2, str(local), "ok", 33, 17, "webp", hashlib.sha256(WEBP).hexdigest()),
    ]
    tables = []
    for workers in (1, 4):
        stats = StepStats("image_db")
        fetcher = ImageFetcher(timeout_s=2, retries=0, policy=FetchPolicy.for_input(str(tmp_path), allowed_networks=["127.0.0.1/32"]))
        table = build_image_table(iter(docs), "part-0", fetcher, stats, workers=workers)
        assert table.schema == IMAGE_DB_SCHEMA
        rows = table.to_pylist()
        got = [
            (r["image_id"], r["doc_id"], r["position"], r["source"], r["status"], r["width"], r["height"], r["format"], r["sha256"])
            for r in rows
        ]
        assert got == expected
        assert {r["shard"] for r in rows} == {"part-0"}
        assert [r["image_bytes"] for r in rows] == [PNG, PNG, None, None, WEBP]
        assert [r["error"] for r in rows][:2] == [None, None] and rows[4]["error"] is None
        assert rows[2]["error"] == "UnidentifiedImageError: cannot identify image file data"
        assert rows[3]["error"].startswith("http_404")
        assert stats.as_dict() == {
            "fetch_error_http_404": 1,
            "images_fetch_failed": 1,
            "images_in": 5,
            "images_ok": 3,
            "images_undecodable": 1,
            "seconds": 0.0,
        }
        tables.append(table)
    assert tables[0].equals(tables[1])


def test_build_image_table_empty():
    table = build_image_table([Document("t", [None], ["Text only."], {})], "s", ImageFetcher(), StepStats("x"))
    assert table.num_rows == 0 and table.schema == IMAGE_DB_SCHEMA


def test_build_sentence_table():
    docs = [
        Document("d1", [None, PNG, None], ["Dr. Lee met Mr. Park. They spoke.", None, "  "], {}),
        Document("d2", [None], ["One sentence only, e.g. this one."], {}),
    ]
    stats = StepStats("sentence_db")
    table = build_sentence_table(docs, "part-9", SentenceSplitter(), stats)
    assert table.schema == SENTENCE_DB_SCHEMA
    assert table.to_pylist() == [
        {
            "sentence_id": "part-9/d1#0.0",
            "shard": "part-9",
            "doc_id": "d1",
            "position": 0,
            "sentence_index": 0,
            "text": "Dr. Lee met Mr. Park.",
        },
        {"sentence_id": "part-9/d1#0.1", "shard": "part-9", "doc_id": "d1", "position": 0, "sentence_index": 1, "text": "They spoke."},
        {
            "sentence_id": "part-9/d2#0.0",
            "shard": "part-9",
            "doc_id": "d2",
            "position": 0,
            "sentence_index": 0,
            "text": "One sentence only, e.g. this one.",
        },
    ]
    assert stats.as_dict() == {"paragraphs_empty": 1, "paragraphs_in": 3, "sentences_out": 3, "seconds": 0.0}
    assert build_sentence_table([], "s", SentenceSplitter(), StepStats("x")).equals(pa.Table.from_pylist([], schema=SENTENCE_DB_SCHEMA))


def test_image_fetcher_pickles_for_process_pools():
    import pickle

    fetcher = pickle.loads(pickle.dumps(ImageFetcher(timeout_s=3, max_bytes=10, policy=LOOPBACK, max_pixels=99)))
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.policy, fetcher.max_pixels) == (3.0, 10, LOOPBACK, 99)
    assert fetcher.policy.address_verdict(__import__("ipaddress").ip_address("127.0.0.1")) is None
    assert _reason(fetcher, b"x" * 11) == "too_large"

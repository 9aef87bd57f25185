"""The bundled sample corpus: planted noise counted exactly, deterministic, readable by the ingest stage."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from realsyn.fetch_policy import FetchPolicy
from realsyn.filters.image_rules import ImageRuleFilter
from realsyn.filters.sentence_rules import SentenceRuleFilter
from realsyn.image_db import ImageFetcher, build_image_table, build_sentence_table
from realsyn.readers import list_input_shards, shard_key
from realsyn.readers.obelics import ObelicsReader
from realsyn.sample_corpus import build_sample_corpus, main
from realsyn.stats import StepStats
from realsyn.text.sentences import SentenceSplitter

PLANTED = {
    "documents": 32,
    "malformed_documents": 1,
    "photos": 21,
    "image_slots": 33,
    "exact_duplicate_images": 3,
    "near_duplicate_images": 3,
    "tiny_images": 2,
    "extreme_aspect_images": 2,
    "undecodable_images": 1,
    "local_path_images": 1,
    "unreachable_url_images": 1,
    "paragraphs": 60,
    "sentences": 179,
    "emoji_sentences": 3,
    "url_sentences": 3,
    "too_short_sentences": 3,
    "too_long_sentences": 2,
    "duplicate_sentences": 6,
}


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "a")
    return out, build_sample_corpus(out, n_shards=4, seed=0)


def test_planted_counts_and_layout(corpus):
    out, summary = corpus
    assert {k: summary[k] for k in PLANTED} == PLANTED
    assert summary["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.jsonl"]
    assert "chelsea" in summary["photo_names"] and "china" in summary["photo_names"] and "flower" in summary["photo_names"]
    assert summary["expected_image_status"] == {"ok": 31, "undecodable": 1, "fetch_refused": 1}
    files = _files(out)
    assert sorted(f for f in files if not f.startswith("images/")) == ["_sample_corpus.json", *summary["shards"]]
    assert len([f for f in files if f.startswith("images/")]) == 1
    assert summary["total_bytes"] < 8_000_000


def test_same_seed_is_byte_identical_and_other_seed_differs(corpus, tmp_path):
    out, summary = corpus
    again = build_sample_corpus(str(tmp_path / "b"), n_shards=4, seed=0)
    assert _files(out) == _files(str(tmp_path / "b"))
    assert {k: v for k, v in again.items() if k != "out_dir"} == {k: v for k, v in summary.items() if k != "out_dir"}
    other = build_sample_corpus(str(tmp_path / "c"), n_shards=4, seed=1)
    assert {k: other[k] for k in PLANTED} == PLANTED
    assert _files(str(tmp_path / "c")) != _files(out)


def test_ingest_reads_it_all_back_with_exact_noise(corpus):
    out, summary = corpus
    stats, splitter = StepStats("ingest"), SentenceSplitter()
    images, sentences, docs_by_id = [], [], {}
    for shard in list_input_shards(out):
        key = shard_key(shard, out)
        docs = list(ObelicsReader().iter_documents(shard, stats))
        docs_by_id.update({d.doc_id: d for d in docs})
        fetcher = ImageFetcher(timeout_s=2.0, retries=0, policy=FetchPolicy.for_input(out))  # local images under the corpus only
        images += build_image_table(docs, key, fetcher, stats).to_pylist()
        sentences += build_sentence_table(docs, key, splitter, stats).column("text").to_pylist()
    assert [shard_key(s, out) for s in list_input_shards(out)] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert stats.counts["documents_in"] == 33 and stats.dropped == {"malformed_document": 1}
    assert stats.counts["images_in"] == 33 and stats.counts["images_ok"] == 31
    assert stats.counts["paragraphs_in"] == 60 and stats.counts["sentences_out"] == 179

    image_reasons = Counter(ImageRuleFilter().reasons(images))
    assert image_reasons == {None: 27, "short_side": 2, "aspect_ratio": 2, "undecodable": 1, "fetch_refused": 1}
    by_hash = Counter(r["sha256"] for r in images if r["status"] == "ok")
    assert sum(n - 1 for n in by_hash.values()) == 3  # the exact duplicates
    local = [r for r in images if r["source"].endswith(".jpg") and "://" not in r["source"]]
    assert len(local) == 1 and local[0]["status"] == "ok" and local[0]["source"].startswith(out)

    # Near duplicates are 90 % copies of a photo of the same title.
    photo_size = {
        d.metadata["general_metadata"]["title"]: (r["width"], r["height"])
        for r in images
        for d in [docs_by_id[r["doc_id"]]]
        if d.doc_id.startswith("sample-") and d.metadata["general_metadata"]["image_source"] not in ("repost", "resized copy")
    }
    resized = [r for r in images if r["doc_id"].startswith("sample-resized-")]
    assert len(resized) == 3
    for r in resized:
        width, height = photo_size[docs_by_id[r["doc_id"]].metadata["general_metadata"]["title"]]
        assert (r["width"], r["height"]) == (round(width * 0.9), round(height * 0.9))

    sentence_reasons = Counter(SentenceRuleFilter().reasons(sentences))
    assert sentence_reasons == {None: 168, "emoji": 3, "url": 3, "too_few_words": 3, "too_many_words": 2}
    assert len(sentences) - len(set(sentences)) == 6
    assert sum("Dr. " in s or "Mr. " in s for s in sentences) == 7  # kept whole by the trained Punkt model


def test_two_shards_and_bad_shard_count(tmp_path):
    summary = build_sample_corpus(str(tmp_path / "two"), n_shards=2, seed=3)
    assert summary["shards"] == ["part-00000.parquet", "part-00001.jsonl"]
    assert summary["duplicate_sentences"] == 2 and summary["documents"] == 32
    with pytest.raises(ValueError, match="n_shards"):
        build_sample_corpus(str(tmp_path / "one"), n_shards=1)


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path):
    build_sample_corpus(str(tmp_path), n_shards=3)
    build_sample_corpus(str(tmp_path), n_shards=2)
    assert [os.path.basename(s) for s in list_input_shards(str(tmp_path))] == ["part-00000.parquet", "part-00001.jsonl"]


def test_command_line_prints_summary(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--shards", "2", "--seed", "5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_shards"] == 2 and printed["seed"] == 5 and printed["image_slots"] == 33
    assert printed["shards"] == sorted(os.path.basename(s) for s in list_input_shards(str(tmp_path / "cli")))

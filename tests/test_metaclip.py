import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realsyn.curation import metaclip_cli
from realsyn.curation.metaclip import (
    EntryCounter,
    MetaClipMatcher,
    StreamingBalancer,
    balance,
    balance_epoch,
    distribution_table,
    entry_counts,
    head_tail_summary,
    keep_probability,
    lists_to_csr,
    load_metadata,
    metaclip_spacing,
    plot_cumulative,
)
from realsyn.plugins import build_plugin
from realsyn.samplers import uniform_keys
from realsyn.samplers.metaclip import MetaClipSampler

META = [
    "dog",  # 0
    "Dog",  # 1
    "hot dog",  # 2
    "hot-dog",  # 3
    "cat",  # 4
    "dog's",  # 5
    "new york",  # 6
    "york",  # 7
    "new york city",  # 8
    "St. Louis",  # 9: its '.' is not wrapped in the key, so it can never match
    "?",  # 10: a punctuation entry matches wherever that mark is
    "a b",  # 11
]


def oracle(metadata, text):
    """MetaCLIP's rule restated without an automaton: " entry " is a substring of the spaced text
    (a duplicated entry reports its last position)."""
    if not isinstance(text, str):
        return []
    spaced = metaclip_spacing(text)
    last = {f" {e} ": i for i, e in enumerate(metadata)}
    return sorted(i for key, i in last.items() if key in spaced)


@pytest.fixture(scope="module")
def matcher():
    return MetaClipMatcher(META)


@pytest.mark.parametrize(
    "text, expected, rule",
    [
        ("dog", [0], "entry is the whole text (string start and end)"),
        ("a dog", [0], "entry at the end"),
        ("dog food", [0], "entry at the start"),
        ("a Dog", [1], "case-sensitive: 'Dog' only"),
        ("DOG", [], "case-sensitive: no entry"),
        ("dog's bowl", [5], 'apostrophe is not split: only the entry "dog\'s"'),
        ("(dog)", [], "parentheses are not split"),
        ("dog,cat", [0, 4], "comma is split off"),
        ("A dog.", [0], "full stop is split off"),
        ("dog;cat:dog!cat`dog", [0, 4], "; : ! and backtick are split off"),
        ("dog-cat", [], "hyphen is not split"),
        ("hot-dog", [3], "only the hyphenated entry"),
        ("hot dog", [0, 2], "overlapping entries both match"),
        ("new york city", [6, 7, 8], "nested multi-word entries all match"),
        ("hotdog", [], "no match inside a longer word"),
        ("dogs", [], "no match of a prefix"),
        ("dog\tcat", [0, 4], "tab becomes a space"),
        ("new\tyork", [6, 7], "tab inside a multi-word entry"),
        ("new\r\nyork", [7], "\\r\\n becomes two spaces: 'new york' needs exactly one"),
        ("a  b", [], "double space breaks a multi-word entry"),
        ("a b", [11], "multi-word entry"),
        ("St. Louis", [], "entry with an inner '.' never matches (text becomes 'St .  Louis')"),
        ("why?", [10], "'?' is split off and matches the '?' entry"),
        ("", [], "empty text"),
        ("dog\x00cat", [], "NUL is not a separator for matching"),
        ("dog \x00 cat", [0, 4], "NUL between spaces"),
    ],
)
def test_matching_rules(matcher, text, expected, rule):
    assert matcher.match(text) == expected, rule
    assert oracle(META, text) == expected, rule
    assert matcher.match_batch(["cat", text, "dog"]) == [[4], expected, [0]], rule


@pytest.mark.parametrize("mark", [",", ".", ";", ":", "?", "!", "`"])
def test_each_wrapped_mark_is_a_word_boundary(matcher, mark):
    text = f"{mark}dog{mark}cat{mark}"
    expected = [0, 4, 10] if mark == "?" else [0, 4]
    assert matcher.match(text) == expected
    assert matcher.match_batch([text]) == [expected]


@pytest.mark.parametrize("mark", ["-", "'", "(", ")", "/", '"', "|", "\u00a0", "\u3002"])
def test_other_marks_are_not_boundaries(matcher, mark):
    assert matcher.match(f"{mark}dog{mark}cat{mark}") == []


@pytest.mark.parametrize("value", [None, 5, 3.0, b"dog", ["dog"]])
def test_non_string_texts_match_nothing(matcher, value):
    assert matcher.match(value) == []
    assert matcher.match_batch([value, "dog", value]) == [[], [0], []]


def test_duplicate_entry_reports_last_position_as_metaclip():
    m = MetaClipMatcher(["dog", "cat", "dog"])
    assert m.match("a dog and a cat") == [1, 2]
    assert m.match_batch(["a dog"]) == [[2]]


def test_entries_with_their_own_spaces_follow_the_padding_rule():
    meta = [" dog", "", "dog ", "x"]
    # "a, dog" -> " a ,  dog ": key "  dog " (entry " dog") and key "  " (entry "") both occur
    assert MetaClipMatcher(meta).match("a, dog") == [0, 1] == oracle(meta, "a, dog")
    assert MetaClipMatcher(meta).match("dog  x") == [1, 2, 3] == oracle(meta, "dog  x")
    assert MetaClipMatcher(meta).match_batch(["a, dog", "dog  x", "x"]) == [[0, 1], [1, 2, 3], [3]]


def test_spacing_matches_metaclip_code():
    assert metaclip_spacing("A dog,cat.\tx") == " A dog , cat .  x "
    assert metaclip_spacing("a, b\r\n") == " a ,  b   "
    assert metaclip_spacing("`x`;y:z?!") == "  ` x `  ; y : z ?  !  "


def _random_texts(n, seed):
    rng = random.Random(seed)
    words = ["dog", "Dog", "hot", "cat", "new", "york", "city", "a", "b", "St", "Louis", "dog's", "hot-dog", "x", "é", "😀", "\ud800"]
    marks = [" ", " ", " ", "  ", ",", ".", ";", ":", "?", "!", "`", "\t", "\n", "\r", "-", "(", ")", "'", "\x00"]
    texts = []
    for _ in range(n):
        parts = [rng.choice(words) + rng.choice(marks) for _ in range(rng.randint(0, 8))]
        texts.append("".join(parts))
    texts[3] = None
    texts[7] = 42
    return texts


def test_batch_equals_per_text_and_oracle_on_random_texts():
    texts = _random_texts(600, seed=1)
    m = MetaClipMatcher(META, chunk_size=64)
    single = [m.match(t) for t in texts]
    assert m.match_batch(texts) == single
    assert single == [oracle(META, t) for t in texts]
    assert sum(map(len, single)) > 300  # the random texts do exercise matches
    offsets, ids = m.match_batch_csr(texts)
    assert offsets.tolist() == np.cumsum([0] + [len(s) for s in single]).tolist()
    assert ids.tolist() == [i for s in single for i in s]


def test_batch_with_separator_in_every_text_falls_back_exactly():
    texts = ["dog \x00 cat", "\x00", "new york\x00", "a b"]
    m = MetaClipMatcher(META)
    assert m.match_batch(texts) == [[0, 4], [], [], [11]]


TRICKY_META = [
    "dog",
    "hot dog",
    " dog",  # leading space: key "  dog "
    "dog ",
    "",  # key "  ": two spaces in a row
    "a  b",  # inner double space
    "new york city",
    "new york",
    "é",
    "😀 x",
    "\ud800",  # a lone surrogate
    "x,y",  # an unwrapped comma: can never match
    "?",
    "dog",  # duplicate: the last position wins
    "one two three four five six",
]


def _tricky_texts(n, seed):
    rng = random.Random(seed)
    words = [
        "dog",
        "hot",
        "new",
        "york",
        "city",
        "new york city",
        "a",
        "a  b",
        "x",
        "y",
        "é",
        "😀",
        "\ud800",
        "one two three four five six",
    ]
    marks = [" ", " ", " ", "  ", "   ", ",", ".", "?", "\t", "\n", "-", "\x01", "\x00"]
    return ["".join(rng.choice(words) + rng.choice(marks) for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.mark.parametrize("chunk_size, max_chunk_bytes", [(4096, 1 << 22), (7, 40), (1, 1)])
def test_matcher_equals_oracle_on_tricky_entries_and_chunkings(chunk_size, max_chunk_bytes):
    texts = _tricky_texts(400, seed=chunk_size)
    m = MetaClipMatcher(TRICKY_META, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes)
    expected = [oracle(TRICKY_META, t) for t in texts]
    assert m.match_batch(texts) == expected
    assert [m.match(t) for t in texts[:50]] == expected[:50]
    assert sum(map(len, expected)) > 400 and {2, 3, 4, 5, 6, 13, 14} <= {i for e in expected for i in e}


def test_a_hash_hit_is_a_match_only_if_its_bytes_equal_the_entry(monkeypatch):
    m = MetaClipMatcher(META)
    cat = (META.index("cat") + 1) * 2
    real_lookup = m._index._lookup
    # Every substring between two spaces that is no entry now "hashes" to "cat": only real cats survive the byte check.
    monkeypatch.setattr(
        m._index, "_lookup", lambda hashes: np.where(real_lookup(hashes) >= 2, real_lookup(hashes), real_lookup(hashes) | cat)
    )
    assert m.match_batch(["a dog", "cat", "a cot", "cats", "dog, cat"]) == [[0], [4], [], [], [0, 4]]


def test_a_base_under_which_two_entries_share_a_hash_is_never_used(monkeypatch):
    from realsyn.curation import metaclip

    real = metaclip._KeyIndex._space_led_hashes
    bases = []

    def colliding_first(self, prefix, start, end):
        bases.append(int(self._base))
        hashes = real(self, prefix, start, end)
        return hashes * 0 + hashes[0] if len(bases) == 1 else hashes  # the first base: every string collides

    monkeypatch.setattr(metaclip._KeyIndex, "_space_led_hashes", colliding_first)
    m = MetaClipMatcher(META)
    assert bases == list(metaclip._BASES[:2])
    texts = _random_texts(200, seed=5)
    assert m.match_batch(texts) == [oracle(META, t) for t in texts]


def test_long_texts_and_many_spaces():
    m = MetaClipMatcher(META, chunk_size=3, max_chunk_bytes=64)
    texts = ["dog " * 5000 + "new york city", " " * 300, "hot dog" + "\n" * 100 + "cat", ""]
    assert m.match_batch(texts) == [oracle(META, t) for t in texts] == [[0, 6, 7, 8], [], [0, 2, 4], []]


def test_load_metadata(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(META))
    assert load_metadata(str(path)) == META
    path.write_text(json.dumps({"dog": 1}))
    with pytest.raises(ValueError):
        load_metadata(str(path))


# ---------------------------------------------------------------------------- counting and balancing


def test_entry_counts_and_streaming_counter():
    matches = [[0, 2], [], [2], [1, 2], [0]]
    assert entry_counts(matches, 4).tolist() == [2, 1, 3, 0]
    counter = EntryCounter(4)
    counter.update(matches[:2])
    counter.update(iter(matches[2:]))
    assert counter.counts.dtype == np.int64 and counter.counts.tolist() == [2, 1, 3, 0]


def test_keep_probability_formula():
    counts = np.array([10, 200, 1000, 0])
    matches = [[1, 2], [2], [], [0, 2], [1], [3]]
    # p = min(1, 100 / count) = [1, 0.5, 0.1, 1 (unseen entry counts as tail)]
    expected = [1 - 0.5 * 0.9, 0.1, 0.0, 1.0, 0.5, 1.0]
    np.testing.assert_allclose(keep_probability(matches, counts, 100), expected, rtol=0, atol=1e-12)


def test_tail_only_keeps_every_matched_text():
    matches = [[0], [], [1, 2], [2], []]
    counts = entry_counts(matches, 3)
    mask = balance(matches, counts, t=20000, seed=0)
    assert mask.tolist() == [True, False, True, True, False]


def test_head_entry_is_downsampled_to_t_over_count():
    matches = [[0]] * 10000 + [[1]] * 50
    counts = entry_counts(matches, 2)
    mask = balance(matches, counts, t=100, seed=7)
    head_kept = int(mask[:10000].sum())
    # Binomial(10000, 0.01): mean 100, sd 9.95; 5 sd bounds
    assert 50 <= head_kept <= 150
    assert mask[10000:].all()  # tail entry (count 50 <= t) keeps everything
    np.testing.assert_array_equal(mask, balance(matches, counts, t=100, seed=7))
    assert not np.array_equal(mask, balance(matches, counts, t=100, seed=8))
    e0 = balance_epoch(matches, counts, 100, seed=7, epoch=0)
    e1 = balance_epoch(matches, counts, 100, seed=7, epoch=1)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e1, balance_epoch(matches, counts, 100, seed=7, epoch=1))
    assert 50 <= int(e1[:10000].sum()) <= 150


def test_streaming_balancer_equals_whole_pool_whatever_the_batches():
    rng = np.random.default_rng(0)
    matches = [sorted(set(rng.integers(0, 5, size=rng.integers(0, 3)).tolist())) for _ in range(1000)]
    counts = entry_counts(matches, 5)
    whole = balance(matches, counts, t=50, seed=3)
    streamer = StreamingBalancer(counts, 50, 3)
    parts, start = [], 0
    for size in [1, 7, 300, 92, 600]:
        parts.append(streamer.keep_csr(*lists_to_csr(matches[start : start + size])))
        start += size
    np.testing.assert_array_equal(np.concatenate(parts), whole)


# ---------------------------------------------------------------------------- transparency


def test_distribution_table_and_summary():
    before, after = np.array([5, 0, 300, 100]), np.array([5, 0, 98, 100])
    table = distribution_table(before, after, ["a", "b", "c", "d"], t=100)
    assert table.column_names == ["entry_id", "entry", "count_before", "count_after", "is_head"]
    assert table.to_pydict() == {
        "entry_id": [0, 1, 2, 3],
        "entry": ["a", "b", "c", "d"],
        "count_before": [5, 0, 300, 100],
        "count_after": [5, 0, 98, 100],
        "is_head": [False, False, True, False],
    }
    assert head_tail_summary(before, after, 100) == {
        "head_entries": 1,
        "tail_entries": 2,
        "unmatched_entries": 1,
        "matches_before": 405,
        "matches_after": 203,
        "head_matches_before": 300,
        "head_matches_after": 98,
        "tail_matches_before": 105,
        "tail_matches_after": 105,
    }
    with pytest.raises(ValueError):
        distribution_table(before, after, ["a"], t=100)


def test_plot_cumulative_writes_png(tmp_path):
    out = tmp_path / "plot.png"
    png = plot_cumulative(np.array([1, 500, 3, 0]), np.array([1, 100, 3, 0]), 100, str(out))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.read_bytes() == png


# ---------------------------------------------------------------------------- command line


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_match_and_balance_jsonl(tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(META))
    src = tmp_path / "in.jsonl"
    _write_jsonl(
        src, [{"text": "a hot dog"}, {"text": None}, "{not json", {"other": "dog"}, "", {"text": "new york city?"}, {"text": "nothing"}]
    )
    out = tmp_path / "out" / "matches.jsonl"
    assert (
        metaclip_cli.main(
            ["match", "--metadata", str(meta), "--input", str(src), "--text-column", "text", "--output", str(out), "--batch-size", "2"]
        )
        == 0
    )
    assert _read_jsonl(out) == [
        {"row": 0, "entry_ids": [0, 2]},
        {"row": 1, "entry_ids": []},
        {"row": 2, "entry_ids": []},
        {"row": 3, "entry_ids": []},
        {"row": 4, "entry_ids": [6, 7, 8, 10]},
        {"row": 5, "entry_ids": []},
    ]
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["rows_matched"] == 2 and summary["matches"] == 6
    assert summary["dropped_bad_json"] == 1 and summary["dropped_missing_text_field"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["matches.jsonl"]  # no temporary file left

    kept = tmp_path / "kept.jsonl"
    plot = tmp_path / "plot.png"
    assert (
        metaclip_cli.main(
            [
                "balance",
                "--matches",
                str(out),
                "--t",
                "5",
                "--seed",
                "0",
                "--output",
                str(kept),
                "--metadata",
                str(meta),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert _read_jsonl(kept) == [{"row": 0, "entry_ids": [0, 2]}, {"row": 4, "entry_ids": [6, 7, 8, 10]}]
    summary = json.loads(capsys.readouterr().out)
    assert summary["texts"] == 6 and summary["texts_matched"] == 2 and summary["texts_kept"] == 2
    assert summary["head_entries"] == 0 and summary["tail_entries"] == 6
    assert summary["matches_before"] == summary["matches_after"] == 6
    dist = pq.read_table(tmp_path / "kept.distribution.parquet")
    assert dist.num_rows == len(META) and dist.column("count_before").to_pylist()[:3] == [1, 0, 1]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_parquet_in_and_out_and_head_balancing(tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(["dog", "cat"]))
    texts = ["dog"] * 2000 + ["cat", None, "a cat and a dog"]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"caption": texts, "n": list(range(len(texts)))}), src)
    out = tmp_path / "matches.parquet"
    assert (
        metaclip_cli.main(
            ["match", "--metadata", str(meta), "--input", str(src), "--text-column", "caption", "--output", str(out), "--batch-size", "500"]
        )
        == 0
    )
    table = pq.read_table(out)
    assert table.column("row").to_pylist() == list(range(len(texts)))
    assert table.column("entry_ids").to_pylist()[-4:] == [[0], [1], [], [0, 1]]
    capsys.readouterr()

    kept = tmp_path / "kept.parquet"
    assert metaclip_cli.main(["balance", "--matches", str(out), "--t", "100", "--seed", "1", "--output", str(kept)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["head_entries"] == 1 and summary["tail_entries"] == 1  # dog: 2001 > 100, cat: 2
    rows = pq.read_table(kept).column("row").to_pylist()
    assert {2000, 2002} <= set(rows)  # the 'cat' texts are tail: always kept
    assert 50 <= len([r for r in rows if r < 2000]) <= 160  # Binomial(2000, 100/2001)
    assert summary["texts_kept"] == len(rows)
    # same seed, same kept rows
    kept2 = tmp_path / "kept2.parquet"
    assert metaclip_cli.main(["balance", "--matches", str(out), "--t", "100", "--seed", "1", "--output", str(kept2)]) == 0
    assert pq.read_table(kept2).column("row").to_pylist() == rows


def test_cli_rejects_missing_column_and_bad_extension(tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(["dog"]))
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"caption": ["dog"]}), src)
    out = tmp_path / "m.jsonl"
    assert metaclip_cli.main(["match", "--metadata", str(meta), "--input", str(src), "--text-column", "TEXT", "--output", str(out)]) == 2
    assert not out.exists()
    assert (
        metaclip_cli.main(
            ["match", "--metadata", str(meta), "--input", str(src), "--text-column", "caption", "--output", str(tmp_path / "m.csv")]
        )
        == 2
    )
    assert "error" in capsys.readouterr().err


def test_cli_reads_and_writes_s3(tmp_path, capsys):
    from tests.s3_server import moto_s3

    with moto_s3(("curation",)):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.pipe_file("curation/meta.json", json.dumps(META).encode())
        with fs.open("curation/in/texts.parquet", "wb") as f:
            pq.write_table(pa.table({"TEXT": ["a hot dog", "nothing", "York, new york"]}), f)
        out = "s3://curation/out/matches.jsonl"
        assert (
            metaclip_cli.main(
                [
                    "match",
                    "--metadata",
                    "s3://curation/meta.json",
                    "--input",
                    "s3://curation/in/texts.parquet",
                    "--text-column",
                    "TEXT",
                    "--output",
                    out,
                ]
            )
            == 0
        )
        assert [json.loads(line) for line in fs.cat_file("curation/out/matches.jsonl").decode().splitlines()] == [
            {"row": 0, "entry_ids": [0, 2]},
            {"row": 1, "entry_ids": []},
            {"row": 2, "entry_ids": [6, 7]},
        ]
        assert fs.ls("curation/out", detail=False) == ["curation/out/matches.jsonl"]
    capsys.readouterr()


def test_add_metaclip_commands_wires_into_a_parent_parser(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="realsyn")
    metaclip_cli.add_metaclip_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["metaclip", "balance", "--matches", "m.jsonl", "--t", "3", "--seed", "1", "--output", "k.jsonl"])
    assert args.func is metaclip_cli.cmd_balance and args.t == 3 and args.epoch is None


# ---------------------------------------------------------------------------- graph sampler


def _candidates(ids, real, synthetic):
    return pa.table(
        {
            "image_id": ids,
            "cluster": list(range(len(ids))),
            "real_texts": pa.array(real, pa.list_(pa.string())),
            "synthetic_caption": synthetic,
        }
    )


def test_sampler_fit_select_and_report(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(META))
    b1 = _candidates(["i0", "i1", "i2"], [["a dog", "a cat"], [], None], ["hot dog", "nothing", None])
    b2 = _candidates(["i3", None], [["York"], ["dog"]], ["new york", "cat"])
    sampler = build_plugin("sampler", {"name": "metaclip", "params": {"metadata_path": str(meta), "t": 20000, "seed": 0}})
    assert isinstance(sampler, MetaClipSampler) and sampler.required_columns == ("image_id", "real_texts", "synthetic_caption")
    offsets, ids = sampler.row_matches(b1)
    assert offsets.tolist() == [0, 3, 3, 3] and ids.tolist() == [0, 2, 4]  # union of list elements and caption
    state = sampler.fit([b1, b2])
    assert state["counts"].tolist() == [1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0]  # the row without an id is not counted
    np.testing.assert_array_equal(state["counts_after"], state["counts"])  # all tail: everything kept
    assert sampler.select(b1, state).tolist() == [True, False, False]
    assert sampler.select(b2, state).tolist() == [True, False]  # null image id is dropped
    assert sampler.stats.dropped == {"balanced_out": 0, "no_metadata_match": 2, "null_image_id": 1}
    report = sampler.report(state)
    assert report["metaclip_distribution.parquet"].column("count_before").to_pylist() == state["counts"].tolist()
    assert report["metaclip_cumulative.png"][:4] == b"\x89PNG"


def test_sampler_head_balancing_is_hash_based_and_batch_independent(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(["dog", "cat"]))
    n = 3000
    ids = [f"img{i}" for i in range(n)]
    table = _candidates(ids, [["a dog"]] * (n - 10) + [["a cat"]] * 10, ["x"] * n)
    sampler = MetaClipSampler(str(meta), t=300, seed=5, text_columns=("real_texts",))
    state = sampler.fit(table.slice(s, 700) for s in range(0, n, 700))
    assert state["counts"].tolist() == [n - 10, 10]
    whole = sampler.select(table, state)
    pieces = np.concatenate([sampler.select(table.slice(s, 256), state) for s in range(0, n, 256)])
    np.testing.assert_array_equal(whole, pieces)
    expected = uniform_keys(ids, 5) < np.r_[np.full(n - 10, 1 - (1 - 300 / (n - 10))), np.ones(10)]
    np.testing.assert_array_equal(whole, expected)
    assert state["counts_after"].tolist() == [int(whole[: n - 10].sum()), 10]
    assert 200 <= int(whole[: n - 10].sum()) <= 400  # Binomial(2990, 300/2990)
    other_epoch = MetaClipSampler(str(meta), t=300, seed=5, text_columns=("real_texts",), epoch=1)
    assert not np.array_equal(other_epoch.select(table, state), whole)


def test_sampler_reasons_reuse_the_fitted_matches_in_fitting_order(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(META))
    b1 = _candidates(["i0", "i1", "i2", None], [["a dog", "a cat"], [], None, ["dog"]], ["hot dog", "nothing", None, "cat"])
    b2 = _candidates(["i3", "i4"], [["York"], ["new york"]], ["new york", "a b"])
    b3 = _candidates([], [], [])
    fresh = MetaClipSampler(str(meta), t=1, seed=3)
    state = fresh.fit([b1, b2, b3])
    expected = [MetaClipSampler(str(meta), t=1, seed=3).reasons(b, state) for b in (b1, b2, b3)]  # matched afresh
    calls = []
    sampler = MetaClipSampler(str(meta), t=1, seed=3)
    real = sampler.row_matches
    sampler.row_matches = lambda batch: calls.append(batch.num_rows) or real(batch)
    fitted_state = sampler.fit([b1, b2, b3])
    assert calls == [4, 2, 0]
    assert [sampler.reasons(b, fitted_state) for b in (b1, b2, b3)] == expected
    assert calls == [4, 2, 0] and "rematched_rows" not in sampler.stats.counts  # no text matched twice
    assert sampler.reasons(b1, fitted_state) == expected[0] and calls[-1] == 4  # past the fitted batches: matched afresh

    # Out of order, another state, or the same ids with other texts: matched afresh, same answers.
    state = sampler.fit([b1, b2])
    assert sampler.reasons(b2, state) == expected[1] and sampler.reasons(b1, state) == expected[0]
    state = sampler.fit([b1, b2])
    assert sampler.reasons(b1, dict(state)) == expected[0]
    state = sampler.fit([b1])
    other_texts = b1.set_column(3, "synthetic_caption", pa.array(["a cat", "dog", "dog", "cat"]))
    calls.clear()
    got = sampler.reasons(other_texts, state)
    assert calls == [4] and got == MetaClipSampler(str(meta), t=1, seed=3).reasons(other_texts, state)
    assert sampler.stats.counts["rematched_rows"] > 0


def test_realsyn_cli_writes_gzipped_matches_and_exits_2_on_bad_input(tmp_path, capsys):
    import gzip as _gzip

    from realsyn.cli import main as realsyn_main

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(["dog", "red car"]))
    src = tmp_path / "in.jsonl"
    src.write_text('{"t": "a dog and a red car"}\n{"t": "nothing"}\n')
    out = tmp_path / "m.jsonl.gz"
    assert (
        realsyn_main(["metaclip", "match", "--metadata", str(meta), "--input", str(src), "--text-column", "t", "--output", str(out)]) == 0
    )
    rows = [json.loads(line) for line in _gzip.open(out, "rt")]
    assert rows == [{"row": 0, "entry_ids": [0, 1]}, {"row": 1, "entry_ids": []}]
    assert (
        realsyn_main(
            [
                "metaclip",
                "match",
                "--metadata",
                str(tmp_path / "missing.json"),
                "--input",
                str(src),
                "--text-column",
                "t",
                "--output",
                str(tmp_path / "x.jsonl"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("realsyn metaclip match: error:") and "missing.json" in err[0]

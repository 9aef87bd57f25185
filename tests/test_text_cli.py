"""`realsyn text perplexity|filter|points` through realsyn.cli.main, on small files."""

import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realsyn.cli import main
from realsyn.curation.text_cli import parse_plugin_spec
from realsyn.curation.textio import infix_path, sibling_path, split_extension

# (sentence, reason with --filter 'rules:{"max_words": 12}' --filter cat)
SENTENCES = [
    ("A man in a red shirt is riding a brown horse on the beach.", "too_many_words"),  # 13 words
    ("Two dogs are chasing a ball across the green grass.", None),
    ("Visit www.example.com for more photos.", "url"),
    ("Great view \N{SMILING FACE WITH HEART-SHAPED EYES} from the top of the hill.", "emoji"),
    ("Sunset.", "too_few_words"),
    ("A large oval Stop sign near some trees.", "no_action"),  # attributes, but no verb
    ("The kitchen is clean.", "no_action"),
    ("The old bridge crosses a wide river in the valley.", None),
    ("He opened the door.", None),
    ("A woman holding an umbrella walks down a busy street.", None),
    ("It is what it is.", "below_c1"),  # no object carries an attribute or relation
]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _summary(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON line
    return json.loads(out[0])


def test_output_names():
    assert infix_path("s3://b/out.parquet", "excluded") == "s3://b/out.excluded.parquet"
    assert infix_path("out.jsonl.gz", "excluded") == "out.excluded.jsonl.gz"
    assert sibling_path("out.jsonl", "distribution.parquet") == "out.distribution.parquet"
    assert split_extension("a.b.PARQUET") == ("a.b", ".PARQUET")


def test_filter_rules_and_cat_on_jsonl(tmp_path, capsys):
    src = tmp_path / "sentences.jsonl"
    rows = [{"id": i, "text": s} for i, (s, _) in enumerate(SENTENCES)]
    _write_jsonl(src, rows[:4] + ["{not json", "", "[1, 2]"] + rows[4:])
    out = tmp_path / "out" / "kept.jsonl"
    argv = ["text", "filter", "--input", str(src), "--text-column", "text", "--output", str(out)]
    assert main(argv + ["--filter", 'rules:{"max_words": 12}', "--filter", "cat", "--read-batch-rows", "4"]) == 0

    assert _read_jsonl(out) == [{"id": i, "text": s} for i, (s, r) in enumerate(SENTENCES) if r is None]
    assert [r["id"] for r in _read_jsonl(out)] == [1, 7, 8, 9]
    excluded = _read_jsonl(tmp_path / "out" / "kept.excluded.jsonl")
    assert excluded == [{"id": i, "text": s, "reason": r} for i, (s, r) in enumerate(SENTENCES) if r is not None]
    assert sorted(p.name for p in out.parent.iterdir()) == ["kept.excluded.jsonl", "kept.jsonl"]  # no temporary files

    summary = _summary(capsys)
    assert summary["filters"] == ["rules", "cat"] and "band" not in summary
    assert summary["rows"] == 11 and summary["kept"] == summary["output_rows"] == 4 and summary["excluded_output_rows"] == 7
    assert summary["dropped"] == {
        "bad_json": 1,
        "below_c1": 1,
        "emoji": 1,
        "no_action": 2,
        "not_an_object": 1,
        "too_few_words": 1,
        "too_many_words": 1,
        "url": 1,
    }
    assert summary["dropped_no_action"] == 2 and summary["excluded_output"] == str(tmp_path / "out" / "kept.excluded.jsonl")

    # The default word limit (81) keeps the 13-word sentence; cat then keeps it too.
    assert main(argv + ["--filter", "rules", "--filter", "cat"]) == 0
    assert [r["id"] for r in _read_jsonl(out)] == [0, 1, 7, 8, 9]
    assert _summary(capsys)["dropped"].get("too_many_words") is None


def test_filter_perplexity_band_on_parquet_keeps_the_schema(tmp_path, capsys):
    texts = ["A dog runs on the grass."] * 7 + ["Hi", "A cat sleeps on a mat."]
    scores = [29.9, 30.0, 120.0, 200.0, 200.5, None, float("nan"), 50.0, 480.0]
    src = tmp_path / "scored.parquet"
    table = pa.table({"id": pa.array(range(9), pa.int32()), "text": texts, "ppl": pa.array(scores, pa.float32())})
    pq.write_table(table, src, row_group_size=4)
    out = tmp_path / "kept.parquet"
    argv = ["text", "filter", "--input", str(src), "--text-column", "text", "--output", str(out), "--perplexity-column", "ppl"]

    assert main(argv + ["--filter", "rules", "--filter", "perplexity_band", "--read-batch-rows", "3"]) == 0
    summary = _summary(capsys)
    assert summary["band"] == [30.0, 200.0] and summary["band_source"] == "paper"
    kept = pq.read_table(out)
    assert kept.schema == table.schema
    assert kept.column("id").to_pylist() == [1, 2, 3]  # both edges kept
    excluded = pq.read_table(tmp_path / "kept.excluded.parquet")
    assert excluded.schema.names == ["id", "text", "ppl", "reason"]
    assert list(zip(excluded.column("id").to_pylist(), excluded.column("reason").to_pylist())) == [
        (0, "perplexity_below_band"),
        (4, "perplexity_above_band"),
        (5, "perplexity_missing"),
        (6, "perplexity_missing"),
        (7, "too_few_words"),  # rules run first: "Hi" never reaches the band
        (8, "perplexity_above_band"),
    ]

    # The band measured for the embedded scorer; then flags, which win.
    assert main(argv + ["--filter", "perplexity_band", "--band-model", "embedded:smollm2-135m-instruct"]) == 0
    summary = _summary(capsys)
    assert summary["band"] == [10.0, 500.0] and summary["band_source"] == "default_band(embedded:smollm2-135m-instruct)"
    assert pq.read_table(out).column("id").to_pylist() == [0, 1, 2, 3, 4, 7, 8]
    assert main(argv + ["--filter", "rules", "--filter", "perplexity_band", "--low", "100", "--high", "480"]) == 0
    summary = _summary(capsys)
    assert summary["band"] == [100.0, 480.0] and summary["band_source"] == "flags"
    assert pq.read_table(out).column("id").to_pylist() == [2, 3, 4, 8]
    assert summary["dropped"] == {"perplexity_below_band": 2, "perplexity_missing": 2, "too_few_words": 1}


def test_jsonl_to_parquet_and_gzip_output(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"text": "A boy throws a red ball to his dog.", "note": None},
        {"text": "Two birds sit on a wire.", "note": None},
        {"text": "A chef cuts fresh onions in a kitchen.", "note": "late type", "extra": 1},
        {"text": "Hello", "note": 7},  # does not fit the string column: dropped from the Parquet output
    ]
    _write_jsonl(src, rows)
    out = tmp_path / "kept.parquet"
    argv = ["text", "filter", "--input", str(src), "--text-column", "text"]
    assert main(argv + ["--output", str(out), "--read-batch-rows", "2", "--filter", 'rules:{"min_words": 1}']) == 0
    kept = pq.read_table(out)  # typed from all rows seen before the first non-null note
    assert kept.schema == pa.schema([("text", pa.string()), ("note", pa.string()), ("extra", pa.int64())])
    assert kept.to_pylist() == [{**r, "extra": r.get("extra")} for r in rows[:3]]
    summary = _summary(capsys)
    assert summary["kept"] == 4 and summary["output_rows"] == 3 and summary["dropped_parquet_schema_mismatch"] == 1

    gz = tmp_path / "kept.jsonl.gz"
    assert main(argv + ["--output", str(gz), "--filter", "rules"]) == 0
    assert _summary(capsys)["output_rows"] == 3
    with gzip.open(gz, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows[:3]
    with gzip.open(tmp_path / "kept.excluded.jsonl.gz", "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == [{**rows[3], "reason": "too_few_words"}]
    # A gzipped JSONL file is also read.
    assert main(["text", "points", "--input", str(gz), "--score-column", "note", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert _summary(capsys)["scores_not_a_number"] == 1


def test_points_keeps_round_half_up_of_the_lowest_scores(tmp_path, capsys):
    scores = [9.0, 2.0, None, 7.0, 1.0, "n/a", 5.0, 8.0, 3.0, 6.0, 4.0, 10.0]  # 10 numeric
    rows = [{"sid": f"s{i}", "score": s} for i, s in enumerate(scores)]
    src = tmp_path / "scored.jsonl"
    _write_jsonl(src, rows)
    out = tmp_path / "points.jsonl"
    argv = ["text", "points", "--input", str(src), "--score-column", "score", "--output", str(out), "--read-batch-rows", "5"]

    assert main(argv + ["--keep-fraction", "0.25"]) == 0  # 2.5 -> 3
    assert _read_jsonl(out) == [rows[1], rows[4], rows[8]]  # input order
    summary = _summary(capsys)
    assert summary["keep_count"] == 3 and summary["rows_with_score"] == 10 and summary["kept"] == 3
    assert summary["threshold_score"] == 3.0 and summary["rows"] == 12 and summary["scores_not_a_number"] == 1
    assert summary["dropped_perplexity_missing"] == 2 and summary["dropped_perplexity_above_points_cut"] == 7

    assert main(argv + ["--keep-fraction", "0.15", "--id-column", "sid"]) == 0  # 1.5 -> 2
    assert _read_jsonl(out) == [rows[1], rows[4]]
    assert main(argv + ["--keep-fraction", "0.14"]) == 0  # 1.4 -> 1
    assert _read_jsonl(out) == [rows[4]]
    assert main(argv + ["--keep-fraction", "0"]) == 0
    assert _read_jsonl(out) == []
    capsys.readouterr()


def test_points_on_parquet_with_ties_keeps_the_exact_count(tmp_path, capsys):
    n = 41
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=n).astype(np.float32)  # many ties
    src = tmp_path / "scored.parquet"
    pq.write_table(pa.table({"row": np.arange(n), "perplexity": scores, "text": [f"t{i}" for i in range(n)]}), src, row_group_size=10)
    out = tmp_path / "points.parquet"
    argv = ["text", "points", "--input", str(src), "--output", str(out), "--keep-fraction", "0.3"]
    assert main(argv + ["--read-batch-rows", "7"]) == 0
    kept = pq.read_table(out)
    k = math.floor(0.3 * n + 0.5)  # 12.8 -> 13
    assert kept.num_rows == k and kept.column_names == ["row", "perplexity", "text"]
    rows = kept.column("row").to_pylist()
    assert rows == sorted(rows)
    kept_scores = np.sort(kept.column("perplexity").to_numpy())
    np.testing.assert_array_equal(kept_scores, np.sort(scores)[:k])
    assert _summary(capsys)["keep_count"] == k
    # The same rows whatever the batching.
    assert main(argv + ["--read-batch-rows", "40"]) == 0
    assert pq.read_table(out).column("row").to_pylist() == rows
    capsys.readouterr()


def test_perplexity_scores_then_points_keeps_the_fluent(tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    texts = [
        "A man is riding a horse along the beach.",
        "horse the beach riding along A is man a.",
        "The cat is sleeping on a soft blanket.",
        "blanket soft sleeping a The on is cat.",
        "",
    ]
    src = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"k": list("abcde"), "caption": texts}), src)
    out = tmp_path / "scored.jsonl"
    argv = ["text", "perplexity", "--input", str(src), "--text-column", "caption", "--output", str(out)]
    assert main(argv + ["--device", "cpu", "--batch-size", "2"]) == 0
    rows = _read_jsonl(out)
    assert [r["k"] for r in rows] == list("abcde") and [r["caption"] for r in rows] == texts
    ppl = [r["perplexity"] for r in rows]
    assert all(math.isfinite(p) and p >= 1.0 for p in ppl[:4]) and ppl[4] is None
    assert ppl[0] < ppl[1] and ppl[2] < ppl[3]
    summary = _summary(capsys)
    assert summary["rows"] == 5 and summary["rows_scored"] == 4 and summary["rows_without_score"] == 1
    assert summary["model"] == "embedded:smollm2-135m-instruct" and summary["output_rows"] == 5
    assert summary["model_load_seconds"] > 0 and summary["scored_rows_per_second"] > 0

    kept = tmp_path / "points.parquet"
    assert main(["text", "points", "--input", str(out), "--keep-fraction", "0.5", "--output", str(kept), "--id-column", "k"]) == 0
    assert pq.read_table(kept).column("k").to_pylist() == ["a", "c"]
    capsys.readouterr()


def test_s3_round_trip(capsys):
    from tests.s3_server import moto_s3

    with moto_s3(("curation",)):
        import s3fs

        fs = s3fs.S3FileSystem()
        with fs.open("curation/in/sentences.parquet", "wb") as f:
            pq.write_table(pa.table({"text": [s for s, _ in SENTENCES[:5]]}), f)
        out = "s3://curation/out/kept.jsonl"
        assert (
            main(
                [
                    "text",
                    "filter",
                    "--input",
                    "s3://curation/in/sentences.parquet",
                    "--text-column",
                    "text",
                    "--filter",
                    "rules",
                    "--output",
                    out,
                ]
            )
            == 0
        )
        assert [json.loads(line) for line in fs.cat_file("curation/out/kept.jsonl").decode().splitlines()] == [
            {"text": SENTENCES[0][0]},
            {"text": SENTENCES[1][0]},
        ]
        excluded = [json.loads(line) for line in fs.cat_file("curation/out/kept.excluded.jsonl").decode().splitlines()]
        assert [r["reason"] for r in excluded] == ["url", "emoji", "too_few_words"]
        assert sorted(fs.ls("curation/out", detail=False)) == ["curation/out/kept.excluded.jsonl", "curation/out/kept.jsonl"]
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # moto prints its own start line
        assert summary["kept"] == 2 and summary["dropped"] == {"emoji": 1, "too_few_words": 1, "url": 1}


def test_bad_input_exits_2_with_a_clear_message_and_no_output(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"caption": ["A dog runs."]}), src)
    out = tmp_path / "o.jsonl"
    assert main(["text", "filter", "--input", str(src), "--text-column", "text", "--filter", "rules", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "realsyn text filter: error:" in err and "no column 'text'" in err and "caption" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]

    # The default filters include perplexity_band, which needs the stored score column.
    assert main(["text", "filter", "--input", str(src), "--text-column", "caption", "--output", str(out)]) == 2
    assert "no column 'perplexity'" in capsys.readouterr().err
    assert main(["text", "points", "--input", str(src), "--output", str(out)]) == 2
    assert "no column 'perplexity'" in capsys.readouterr().err

    jsonl = tmp_path / "in.jsonl"
    _write_jsonl(jsonl, [{"caption": "A dog runs."}])
    assert main(["text", "perplexity", "--input", str(jsonl), "--text-column", "text", "--output", str(out)]) == 2
    assert "first row has no field 'text'" in capsys.readouterr().err
    assert (
        main(
            [
                "text",
                "filter",
                "--input",
                str(jsonl),
                "--text-column",
                "caption",
                "--filter",
                "rules",
                "--filter",
                "nope",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "no sentence_filter plug-in named 'nope'" in capsys.readouterr().err
    assert (
        main(
            ["text", "filter", "--input", str(jsonl), "--text-column", "caption", "--filter", "rules", "--output", str(tmp_path / "o.csv")]
        )
        == 2
    )
    assert "expected a .parquet or .jsonl file" in capsys.readouterr().err
    assert main(["text", "points", "--input", str(tmp_path / "absent.jsonl"), "--output", str(out)]) == 2
    assert "absent.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "in.parquet"]

    with pytest.raises(SystemExit) as exit_info:  # argparse: a required flag is missing
        main(["text", "points", "--input", str(jsonl)])
    assert exit_info.value.code == 2


def test_filter_spec_is_a_name_or_a_dotted_path_with_optional_json_params():
    assert parse_plugin_spec("cat") == {"name": "cat", "params": {}}
    assert parse_plugin_spec('rules:{"min_words": 2}') == {"name": "rules", "params": {"min_words": 2}}
    assert parse_plugin_spec("my_pkg.filters:Mine") == {"name": "my_pkg.filters:Mine", "params": {}}
    assert parse_plugin_spec('my_pkg.filters:Mine: {"x": [1, 2]}') == {"name": "my_pkg.filters:Mine", "params": {"x": [1, 2]}}
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_plugin_spec("rules:{min_words: 2}")
    with pytest.raises(ValueError, match="no plug-in name"):
        parse_plugin_spec(':{"min_words": 2}')


def test_filter_plugins_by_dotted_path_and_validated_params(tmp_path, capsys):
    src = tmp_path / "sentences.jsonl"
    _write_jsonl(src, [{"text": s} for s, _ in SENTENCES])
    out = tmp_path / "kept.jsonl"
    argv = ["text", "filter", "--input", str(src), "--text-column", "text", "--output", str(out)]
    dotted = "realsyn.filters.sentence_rules:SentenceRuleFilter"
    assert main(argv + ["--filter", dotted + ':{"max_words": 12}', "--filter", "cat"]) == 0
    assert [r["text"] for r in _read_jsonl(out)] == [s for s, r in SENTENCES if r is None]
    assert _summary(capsys)["filters"] == [dotted, "cat"]
    kept = out.read_bytes()

    def one_error_line(code):
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("realsyn text filter: error: ")
        return err[0]

    # params are checked against the plug-in's typed __init__: the message names the plug-in and the field
    line = one_error_line(main(argv + ["--filter", 'rules:{"max_words": "many"}']))
    assert "sentence_filter 'rules'" in line and "field max_words" in line
    line = one_error_line(main(argv + ["--filter", 'cat:{"min_complexty": 2}']))
    assert "sentence_filter 'cat'" in line and "field min_complexty" in line
    assert "not a JSON object" in one_error_line(main(argv + ["--filter", "rules:{max_words: 12}"]))
    assert "--low/--high" in one_error_line(main(argv + ["--filter", 'perplexity_band:{"low": 1}']))
    assert "cannot import" in one_error_line(main(argv + ["--filter", "no_such_module:Filter"]))
    assert out.read_bytes() == kept  # bad config never touches the output

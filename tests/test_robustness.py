"""Robustness: one bad document never fails a shard, one bad shard never fails the run's other shards,
ids are unique by construction, the bad input is reported, failed asset checks fail the run, and
names that become paths are validated (README "Reliability")."""

import base64
import io
import json
import os
import time

import dagster as dg
import pyarrow as pa
import pytest
from PIL import Image

from assets.partitions import ALL_SHARDS, registered_shards, shard_partitions
from realsyn import layout
from realsyn.export import _check_key, make_sample
from realsyn.readers import list_input_shards, shard_key
from realsyn.stages.ingest import ingest_shard
from realsyn.stages.summary import bad_input, bad_input_lines
from realsyn.storage import InvalidNameError, Storage


def _png(color=(10, 120, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (120, 110), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write(path, lines: list[str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _ingest(tmp_path, name: str, lines: list[str]) -> tuple[Storage, str]:
    corpus = tmp_path / "corpus"
    uri = _write(corpus / name, lines)
    storage = Storage(str(tmp_path / "store"))
    key = shard_key(uri, str(corpus))
    ingest_shard(storage, key, uri, input_uri=str(corpus))
    return storage, key


# ---------------------------------------------------------------------------- one bad document


def test_lone_surrogates_in_a_text_an_id_or_an_image_ref_are_counted_drops(tmp_path):
    lines = [
        json.dumps({"id": "good", "images": [_png(), None], "texts": [None, "A dog runs on the beach."]}),
        '{"id": "bad-text", "images": [null], "texts": ["Broken \\ud800 text."]}',
        '{"id": "bad-\\ud800-id", "images": [null], "texts": ["Fine text."]}',
        '{"id": "bad-ref", "images": ["pics/\\udfff.jpg"], "texts": [null]}',
    ]
    storage, key = _ingest(tmp_path, "s.jsonl", lines)
    images = storage.reader(layout.IMAGE_DB, key)
    sentences = storage.reader(layout.SENTENCE_DB, key)
    assert images.read_parquet(layout.IMAGES_FILE).column("image_id").to_pylist() == ["s/good#0"]
    assert sentences.read_parquet(layout.SENTENCES_FILE).column("sentence_id").to_pylist() == ["s/good#1.0"]
    assert images.info["documents_in"] == 4 and images.info["dropped_invalid_text"] == 3
    assert bad_input(storage, [key]) == {"s": {"documents_in": 4, "documents": {"invalid_text": 3}, "malformed": {}, "paragraphs": {}}}


def test_a_700kb_abbreviation_paragraph_does_not_fail_the_shard(tmp_path):
    huge = "Dr. a. " * 100_000  # 700 kB: Punkt over it whole ran into NLTK's 5 s regex limit
    lines = [
        json.dumps({"id": "huge", "images": [None, None], "texts": [huge, "Then the cat slept. It was late."]}),
        json.dumps({"id": "next", "images": [None], "texts": ["The next document is fine."]}),
    ]
    storage, key = _ingest(tmp_path, "h.jsonl", lines)
    table = storage.reader(layout.SENTENCE_DB, key).read_parquet(layout.SENTENCES_FILE)
    texts = table.column("text").to_pylist()
    assert texts[-3:] == ["Then the cat slept.", "It was late.", "The next document is fine."]
    assert sum(len(t) for t in texts[:-3]) == len(huge.strip()) - (len(texts) - 4)  # chunked: every character kept
    assert max(len(t) for t in texts) <= 20_000
    assert storage.reader(layout.SENTENCE_DB, key).info.get("dropped_sentence_split_failed") is None


def test_punkt_failing_on_every_paragraph_still_commits_the_shard(tmp_path, monkeypatch):
    import nltk.redos

    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 1e-9)  # NLTK's regex time limit hit on every paragraph
    lines = [json.dumps({"id": str(i), "images": [None, None], "texts": ["One. Two.", "Three."]}) for i in range(3)]
    storage, key = _ingest(tmp_path, "t.jsonl", lines)
    reader = storage.reader(layout.SENTENCE_DB, key)
    assert reader.read_parquet(layout.SENTENCES_FILE).num_rows == 0
    assert reader.info["paragraphs_in"] == 6 and reader.info["dropped_sentence_split_failed"] == 6
    assert bad_input_lines(bad_input(storage, [key])) == ["t: 6 paragraphs dropped (sentence_split_failed 6)"]


def test_one_paragraph_a_custom_splitter_fails_on_is_dropped_alone():
    from realsyn.image_db import build_sentence_table
    from realsyn.readers import Document
    from realsyn.stats import StepStats
    from realsyn.text.sentences import SentenceSplitter

    class Flaky(SentenceSplitter):
        def split(self, paragraph):
            if "BOOM" in paragraph:
                raise RecursionError("deep")
            return super().split(paragraph)

    docs = [Document("d", [None, None, None], ["First one. Second.", "BOOM here.", "Third."])]
    stats = StepStats("s")
    table = build_sentence_table(docs, "p", Flaky(), stats)
    assert table.column("sentence_id").to_pylist() == ["p/d#0.0", "p/d#0.1", "p/d#2.0"]
    assert stats.dropped == {"sentence_split_failed": 1}


# ---------------------------------------------------------------------------- ids


def test_ids_are_unique_across_shards_and_export_keys_too(tmp_path):
    # two shards with the same file name and no id column: the shard key is in every id
    lines = [json.dumps({"images": [_png(), None], "texts": [None, "A red boat on a lake."]})]
    corpus = tmp_path / "corpus"
    for sub in ("a", "b"):
        _write(corpus / sub / "part.jsonl", lines)
    storage = Storage(str(tmp_path / "store"))
    image_ids, sentence_ids = [], []
    for uri in list_input_shards(str(corpus)):
        key = shard_key(uri, str(corpus))
        ingest_shard(storage, key, uri, input_uri=str(corpus))
        image_ids += storage.reader(layout.IMAGE_DB, key).read_parquet(layout.IMAGES_FILE).column("image_id").to_pylist()
        sentence_ids += storage.reader(layout.SENTENCE_DB, key).read_parquet(layout.SENTENCES_FILE).column("sentence_id").to_pylist()
    assert image_ids == ["a__part/part-0#0", "b__part/part-0#0"]
    assert sentence_ids == ["a__part/part-0#1.0", "b__part/part-0#1.0"]
    keys = [make_sample(i, b"x", "png", ["t"], [0.5], ["s"], 1, 1, "d")["key"] for i in image_ids]
    assert len(set(keys)) == 2 and all(_check_key(k) for k in keys)


def test_duplicate_doc_ids_never_collide_in_image_ids(tmp_path):
    lines = [json.dumps({"id": i, "images": [_png()], "texts": [None]}) for i in ("x", "x~2", "x")]
    storage, key = _ingest(tmp_path, "dup.jsonl", lines)
    ids = storage.reader(layout.IMAGE_DB, key).read_parquet(layout.IMAGES_FILE).column("image_id").to_pylist()
    assert ids == ["dup/x#0", "dup/x~2#0", "dup/x~2.2#0"]
    # long and odd ids still give distinct, valid WebDataset keys
    odd = [f"{'s' * 80}/{'d' * 100}#{i}" for i in range(3)] + ["a.b/c#0", "a_b/c#0", "a b/c#0"]
    keys = [make_sample(i, b"x", "png", ["t"], [0.5], [], 1, 1, "d")["key"] for i in odd]
    assert len(set(keys)) == len(odd) and all(_check_key(k) for k in keys)


# ---------------------------------------------------------------------------- the bad-input summary


BAD_LINES = [
    json.dumps({"id": "ok", "images": [None], "texts": ["Fine."]}),
    '{"id": "broken", "images": [',  # bad JSON
    json.dumps({"id": "short", "images": [None, None], "texts": ["One."]}),  # wrong lengths
    json.dumps({"id": "nocol", "texts": ["No images column."]}),  # missing column
    json.dumps({"id": "ok2", "images": [None], "texts": ["Fine too."]}),
]


def test_bad_input_lists_per_shard_the_rows_dropped_and_why(tmp_path):
    storage, key = _ingest(tmp_path, "mixed.jsonl", BAD_LINES)
    clean_storage, clean = _ingest(tmp_path, "clean.jsonl", [BAD_LINES[0]])
    report = bad_input(storage, [key, clean, "never-ingested"])
    assert report == {
        "mixed": {
            "documents_in": 5,
            "documents": {"malformed_document": 3},
            "malformed": {"bad_json": 1, "length_mismatch": 1, "missing_images": 1},
            "paragraphs": {},
        }
    }
    assert bad_input_lines(report) == ["mixed: 3 of 5 rows dropped (malformed_document 3; bad_json 1, length_mismatch 1, missing_images 1)"]
    assert bad_input(storage, [key], since=time.time() + 60) == {}  # an older run's ingest is not this run's input


# ---------------------------------------------------------------------------- the runner: a bad shard fails only its partition

SEEN: dict[str, list] = {}


class ToySource(dg.ConfigurableResource):
    """Real JSONL shards under ``input_uri``; the per-shard step is the real ingest."""

    input_uri: str
    storage_root: str

    def list_shards(self) -> dict[str, str]:
        return {shard_key(u, self.input_uri): u for u in list_input_shards(self.input_uri)}


def _toy_graph(fail_global: bool = False, check_passes: bool = False):
    @dg.asset(partitions_def=shard_partitions)
    def toy_ingest(context: dg.AssetExecutionContext, shard_source: ToySource) -> None:
        key = context.partition_key
        ingest_shard(Storage(shard_source.storage_root), key, shard_source.list_shards()[key], input_uri=shard_source.input_uri)

    @dg.asset(deps=[dg.AssetDep(toy_ingest, partition_mapping=ALL_SHARDS)])
    def toy_global(context: dg.AssetExecutionContext, shard_source: ToySource) -> None:
        SEEN.setdefault("global", []).append(registered_shards(context, shard_source))
        if fail_global:
            raise RuntimeError("the global step broke")

    @dg.asset_check(asset=toy_global)
    def toy_caps() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=check_passes, metadata={"largest_cluster": 7})

    @dg.asset(partitions_def=shard_partitions, deps=[toy_global])
    def toy_after(context: dg.AssetExecutionContext) -> None:
        SEEN.setdefault("after", []).append(context.partition_key)

    jobs = [
        dg.define_asset_job("toy_prepare", selection=[toy_ingest], partitions_def=shard_partitions),
        dg.define_asset_job("toy_global_job", selection=[toy_global]),
        dg.define_asset_job("toy_after_job", selection=[toy_after], partitions_def=shard_partitions),
    ]
    return [toy_ingest, toy_global, toy_after], [toy_caps], jobs


@pytest.fixture
def toy_run(tmp_path, monkeypatch):
    """Runs ``realsyn run`` (run_graph and the CLI) over a three-job toy graph whose shard step is the real ingest."""
    import assets.runner
    import definitions

    corpus = tmp_path / "corpus"
    _write(corpus / "good.jsonl", BAD_LINES)
    _write(corpus / "fine.jsonl", [BAD_LINES[0]])
    SEEN.clear()

    def configure(**graph):
        assets_, checks, jobs = _toy_graph(**graph)

        def build(env=None, *, input_uri, storage_root, resource_overrides=None):
            source = ToySource(input_uri=input_uri, storage_root=storage_root)
            return dg.Definitions(assets=assets_, asset_checks=checks, jobs=jobs, resources={"shard_source": source})

        monkeypatch.setattr(definitions, "build_definitions", build)
        monkeypatch.setattr(assets.runner, "JOBS_IN_ORDER", jobs)
        monkeypatch.setattr(assets.runner, "PARTITIONED_JOBS", {"toy_prepare", "toy_after_job"})

    return corpus, tmp_path / "store", configure


def test_a_bad_shard_fails_only_its_partition_and_the_global_steps_cover_the_rest(toy_run):
    from assets.runner import run_graph

    corpus, store, configure = toy_run
    # a shard in another layout (MMC4 rows for the OBELICS reader): nothing in it is a document
    _write(corpus / "wrong-layout.jsonl", [json.dumps({"id": str(i), "text_list": ["Words."], "image_info": []}) for i in range(2)])
    configure(check_passes=True)
    report = run_graph(str(corpus), str(store), instance=dg.DagsterInstance.ephemeral(), log=lambda *_: None)
    assert report.shards == ["fine", "good", "wrong-layout"]
    assert report.failed_shards == {"wrong-layout": "toy_prepare"} and report.stopped_at is None
    assert report.good_shards == ["fine", "good"]
    assert SEEN == {"global": [["fine", "good"]], "after": ["fine", "good"]}
    (failure,) = report.failures
    assert (failure.job, failure.shard, failure.asset) == ("toy_prepare", "wrong-layout", "toy_ingest")
    assert "none of its 2 rows is a document for the obelics reader (missing_images x2)" in failure.message
    assert not report.success


def test_a_failed_asset_check_fails_the_run(toy_run):
    from assets.runner import run_graph

    corpus, store, configure = toy_run
    configure(check_passes=False)
    report = run_graph(str(corpus), str(store), instance=dg.DagsterInstance.ephemeral(), log=lambda *_: None)
    assert not report.success and report.failed_shards == {} and report.stopped_at is None
    (failure,) = report.failures
    assert failure.check == "toy_caps" and failure.asset == "toy_global" and failure.shard is None
    assert str(failure) == (
        "asset check 'toy_caps' of 'toy_global' failed for all shards (global step) (job toy_global_job): did not pass (largest_cluster=7)"
    )
    assert SEEN["after"] == ["fine", "good"]  # a failed check stops nothing


def test_a_failed_global_step_stops_the_graph_and_no_shard_left_stops_it_too(toy_run):
    from assets.runner import run_graph

    corpus, store, configure = toy_run
    configure(fail_global=True, check_passes=True)
    report = run_graph(str(corpus), str(store), instance=dg.DagsterInstance.ephemeral(), log=lambda *_: None)
    assert report.stopped_at == "toy_global_job" and "after" not in SEEN
    assert [f.asset for f in report.failures] == ["toy_global"] and "the global step broke" in report.failures[0].message
    # every shard bad: the global step does not run over nothing
    for name in ("good.jsonl", "fine.jsonl"):
        _write(corpus / name, ['{"broken": '])
    SEEN.clear()
    configure(check_passes=True)
    report = run_graph(str(corpus), str(store), instance=dg.DagsterInstance.ephemeral(), log=lambda *_: None)
    assert report.failed_shards == {"fine": "toy_prepare", "good": "toy_prepare"} and report.stopped_at == "toy_global_job"
    assert SEEN == {}


def test_cli_names_failed_shards_and_checks_and_prints_the_bad_input(toy_run, capsys, monkeypatch):
    from assets.cli import main

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    corpus, store, configure = toy_run
    _write(corpus / "wrong-layout.jsonl", [json.dumps({"id": "0", "text_list": ["Words."], "image_info": []})])
    configure(check_passes=False)
    assert main(["run", "--input", str(corpus), "--storage", str(store)]) == 1
    out, err = capsys.readouterr()
    assert "Bad input: 1 shard(s) lost rows" in out
    assert "  good: 3 of 5 rows dropped (malformed_document 3; bad_json 1, length_mismatch 1, missing_images 1)" in out
    assert "FAILED: asset 'toy_ingest' failed for shard wrong-layout (job toy_prepare): " in err
    assert "none of its 1 rows is a document for the obelics reader" in err
    assert "FAILED: asset check 'toy_caps' of 'toy_global' failed" in err
    assert "realsyn run: 1 of 3 shards failed and were left out: wrong-layout" in err
    assert "the other 2 shards went through every job, the global steps over them" in err
    # all good: exit 0, and the bad input is still said
    os.remove(corpus / "wrong-layout.jsonl")
    configure(check_passes=True)
    assert main(["run", "--input", str(corpus), "--storage", str(store)]) == 0
    out, err = capsys.readouterr()
    assert "realsyn run: every asset materialized for 2 shards" in out and "1 shard(s) lost rows to bad input (above)" in out
    assert "  good: 3 of 5 rows dropped" in out and err == ""


# ---------------------------------------------------------------------------- names that become paths


def test_split_names_are_validated_where_they_enter(tmp_path):
    from assets.configs import SampledSplitsConfig, SplitConfig
    from assets.runner import run_graph

    cap = [{"name": "cluster_cap", "params": {"cap": 2}}]
    assert SplitConfig(name="cap2.v1-a_b", samplers=cap).name == "cap2.v1-a_b"
    for bad in ("../../../../ESCAPED", "a/b", "..", "", ".hidden", "x y"):
        with pytest.raises(ValueError, match="invalid split name"):
            SampledSplitsConfig(splits=[{"name": bad, "samplers": cap}])
    # realsyn run refuses the config before anything runs, and nothing is written anywhere
    corpus = tmp_path / "corpus"
    _write(corpus / "s.jsonl", [BAD_LINES[0]])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"assets": {"sampled_splits": {"splits": [{"name": "../../../../ESCAPED", "samplers": cap}]}}}))
    with pytest.raises(ValueError, match=r"assets.sampled_splits: splits.0.name: Value error, invalid split name '../../../../ESCAPED'"):
        run_graph(str(corpus), str(tmp_path / "store"), config_path=str(cfg), env="local", instance=dg.DagsterInstance.ephemeral())
    assert not (tmp_path / "store").exists() and not list(tmp_path.parent.glob("ESCAPED"))
    # the core refuses it too, at the first write
    with Storage(str(tmp_path / "store")).writer(layout.SAMPLED_SPLITS) as w:
        with pytest.raises(InvalidNameError):
            w.write_parquet(layout.split_selection_file("../../../../ESCAPED", "s"), pa.table({"a": [1]}))


def test_cli_prints_the_committed_path_and_sweeps_orphans(tmp_path, capsys):
    from assets.cli import main

    storage = Storage(str(tmp_path))
    with storage.writer(layout.EXPORTED_SPLITS) as w:
        w.write_json("cap2/sizes.json", {})
    orphan = storage.writer(layout.EXPORTED_SPLITS)  # killed mid-export: a truncated tar beside the current one
    orphan.write_bytes("cap2/cap2-000000.tar", b"trunc")
    assert main(["path", "--storage", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == storage.current_uri(layout.EXPORTED_SPLITS).rstrip("/") + "/"
    assert main(["sweep", "--storage", str(tmp_path)]) == 0  # grace 1 h: the young orphan may be a live writer
    assert capsys.readouterr().out.strip().endswith("0 generation(s) removed (retention 2, grace 3600s)")
    assert main(["sweep", "--storage", str(tmp_path), "--grace-s", "0"]) == 0
    assert f"removed {orphan.gen_dir}" in capsys.readouterr().out
    assert storage.reader(layout.EXPORTED_SPLITS).read_json("cap2/sizes.json") == {}
    assert main(["path", "--storage", str(tmp_path), "image_db", "--partition", "nope"]) == 2
    assert main(["path", "--storage", str(tmp_path), "image_db", "--partition", "../../x"]) == 2

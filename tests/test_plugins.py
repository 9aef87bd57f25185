"""Plug-ins: one contract per kind, {name, params} validated against the class, dotted paths to a user's class."""

import collections

import dagster as dg
import pytest

from realsyn import layout
from realsyn.decisions import reason_counts
from realsyn.plugins import REGISTRY, PluginConfigError, build_plugin, params_model, plugin_class, validate_params
from realsyn.plugins.kinds import KINDS, SentenceFilter


class WordFilter(SentenceFilter):
    """A team's own filter, defined outside the package: drops sentences holding more than ``max_hits`` of ``words``."""

    name = "words"

    def __init__(self, words: list[str], reason: str = "has_word", max_hits: int = 0):
        self.words, self.reason, self.max_hits = {w.lower() for w in words}, reason, max_hits

    def reasons(self, texts):
        return [self.reason if sum(w.strip(".,").lower() in self.words for w in t.split()) > self.max_hits else None for t in texts]


class NotAFilter:
    def __init__(self, x: int = 1):
        self.x = x


def test_every_registered_plugin_resolves_to_its_kind_with_typed_params():
    assert set(REGISTRY) == set(KINDS)
    for kind, names in REGISTRY.items():
        for name in names:
            cls = plugin_class(kind, name)
            assert issubclass(cls, KINDS[kind]), (kind, name)
            params_model(cls)  # every parameter is typed or defaulted


def test_params_are_validated_and_errors_name_kind_plugin_and_field():
    assert validate_params("sentence_filter", "rules", {"min_words": "2"}) == {"min_words": 2, "max_words": 81}
    with pytest.raises(PluginConfigError, match=r"sentence_filter 'rules': field min_words: .*integer"):
        build_plugin("sentence_filter", {"name": "rules", "params": {"min_words": "two"}})
    with pytest.raises(PluginConfigError, match=r"sampler 'cluster_cap': field cap: Field required"):
        build_plugin("sampler", "cluster_cap")
    with pytest.raises(PluginConfigError, match=r"field cpa: Extra inputs are not permitted"):
        build_plugin("sampler", {"name": "cluster_cap", "params": {"cap": 3, "cpa": 3}})
    # a value the constructor itself refuses is reported with the plug-in's name too
    with pytest.raises(PluginConfigError, match=r"sampler 'cluster_cap': cap must be positive"):
        build_plugin("sampler", {"name": "cluster_cap", "params": {"cap": 0}})
    with pytest.raises(PluginConfigError, match=r"no sentence_filter plug-in named 'rulez'; known: \['cat', 'rules'\]"):
        build_plugin("sentence_filter", "rulez")
    with pytest.raises(PluginConfigError, match=r"config must be \{name, params\}"):
        build_plugin("sentence_filter", {"params": {}})


def test_dotted_path_names_a_users_class():
    f = build_plugin("sentence_filter", {"name": "tests.test_plugins:WordFilter", "params": {"words": ["dog"], "max_hits": "1"}})
    # (pytest imports this module under its own name too, so compare by name)
    assert type(f).__qualname__ == "WordFilter" and f.max_hits == 1
    assert f.reasons(["a dog", "a dog and a Dog."]) == [None, "has_word"]
    with pytest.raises(PluginConfigError, match=r"cannot import tests.test_plugins:Missing"):
        build_plugin("sentence_filter", "tests.test_plugins:Missing")
    with pytest.raises(PluginConfigError, match=r"lacks reasons of the SentenceFilter contract"):
        build_plugin("sentence_filter", "tests.test_plugins:NotAFilter")


def test_dagster_config_validates_plugin_params_when_built():
    from assets.configs import SamplerPlugin, SentenceFilterPlugin, SplitConfig

    with pytest.raises(ValueError, match=r"sentence_filter 'cat': field min_complexity"):
        SentenceFilterPlugin(name="cat", params={"min_complexity": "high"})
    split = SplitConfig(name="s", samplers=[SamplerPlugin(name="cluster_cap", params={"cap": 2})]).spec()
    assert split.name == "s" and split.samplers[0].name == "cluster_cap" and split.samplers[0].params == {"cap": 2}


def test_graph_applies_a_dotted_path_filter_from_run_config(tmp_path):
    """A filter defined here, named by dotted path in a run config, runs in the graph with its drop reason."""
    from assets import filter as filter_assets
    from assets import ingest
    from realsyn.sample_corpus import build_sample_corpus
    from realsyn.storage import Storage
    from resources import build_resources

    corpus = tmp_path / "corpus"
    build_sample_corpus(str(corpus))
    resources = build_resources("local", input_uri=str(corpus), storage_root=str(tmp_path / "store"))
    shards = sorted(resources["shard_source"].list_shards())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", shards)
    run_config = {
        "ops": {
            "sentence_candidates": {
                "config": {
                    "filters": [
                        {"name": "rules"},
                        {"name": "tests.test_plugins:WordFilter", "params": {"words": ["the"], "reason": "has_the"}},
                    ]
                }
            }
        }
    }
    assets = [ingest.source_documents, ingest.document_databases, filter_assets.sentence_candidates]
    result = dg.materialize(
        assets,
        resources=resources,
        run_config=run_config,
        instance=instance,
        partition_key=shards[0],
        selection=[layout.IMAGE_DB, layout.SENTENCE_DB, layout.SENTENCE_CANDIDATES],
    )
    assert result.success
    storage = Storage(str(tmp_path / "store"))
    reader = storage.reader(layout.SENTENCE_CANDIDATES, shards[0])
    kept = reader.read_parquet(layout.SENTENCES_FILE).column("text").to_pylist()
    decisions = reader.read_parquet(layout.DECISIONS_FILE)
    db = storage.reader(layout.SENTENCE_DB, shards[0]).read_parquet(layout.SENTENCES_FILE).column("text").to_pylist()
    with_the = [t for t in db if "the" in {w.strip(".,").lower() for w in t.split()}]
    assert with_the and kept and not any(t in with_the for t in kept)
    counts = reason_counts(decisions)
    # the rules filter runs first; the user's filter names what reaches it and holds "the"
    assert 0 < counts["has_the"] <= len(with_the) and decisions.num_rows == len(db)
    assert sum(counts.values()) + len(kept) == len(db)
    # the step's metadata shows the user's reason like any built-in one
    mat = result.asset_materializations_for_node("sentence_candidates")[0]
    assert mat.metadata["dropped_has_the"].value == counts["has_the"]

    # a bad parameter fails the step with one line naming the plug-in and the field
    bad = {
        "ops": {
            "sentence_candidates": {
                "config": {"filters": [{"name": "tests.test_plugins:WordFilter", "params": {"words": ["a"], "max_hits": "many"}}]}
            }
        }
    }
    failed = dg.materialize(
        assets,
        resources=resources,
        run_config=bad,
        instance=instance,
        partition_key=shards[0],
        selection=[layout.SENTENCE_CANDIDATES],
        raise_on_error=False,
    )
    assert not failed.success
    errors = [e.event_specific_data.error for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    messages = collections.Counter((err.cause or err).message for err in errors)
    assert any("tests.test_plugins:WordFilter" in m and "max_hits" in m for m in messages), messages

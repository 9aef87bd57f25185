import os

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realsyn.generation.base import clean_caption  # noqa: E402
from realsyn.generation.cache import CACHE_SCHEMA, CaptionCache, generate_with_cache  # noqa: E402
from realsyn.generation.prompts import (  # noqa: E402
    DEFAULT_CONCISE_CAPTION_PROMPT,
    DEFAULT_FUSION_INSTRUCTION,
    build_fusion_messages,
    prompt_sha,
)
from realsyn.generation.tagging import (  # noqa: E402
    ClipVocabularyTagger,
    load_default_vocabulary,
    merge_vocabularies,
    mine_tags,
)
from realsyn.plugins.kinds import GenerationBackend  # noqa: E402

# ---------------------------------------------------------------- prompts


def test_build_fusion_messages_layout():
    messages = build_fusion_messages(
        ["A dog runs  on the beach.", "", "a dog runs on the beach.", "The sea is calm."],
        caption="a dog on sand",
        tags=["dog", "Beach", "dog", " sea "],
    )
    assert messages == [
        {"role": "system", "content": DEFAULT_FUSION_INSTRUCTION},
        {
            "role": "user",
            "content": "Retrieved real texts:\n1. A dog runs on the beach.\n2. The sea is calm.\n\n"
            "Concise caption: a dog on sand\n\nTags: dog, Beach, sea\n\nCaption:",
        },
    ]


def test_build_fusion_messages_omits_missing_sections_and_takes_instruction():
    only_tags = build_fusion_messages(None, None, ["cat"], instruction="Fuse.")
    assert only_tags == [{"role": "system", "content": "Fuse."}, {"role": "user", "content": "Tags: cat\n\nCaption:"}]
    nothing = build_fusion_messages([None, "  "], caption="   ", tags=[])
    assert nothing[1]["content"] == "No text is available for this image.\n\nCaption:"


def test_prompt_sha_is_stable_and_sensitive():
    m = build_fusion_messages(["A red car."], tags=["car"])
    sha = prompt_sha(m, "model-a", {"max_new_tokens": 48, "temperature": 0})
    assert len(sha) == 64 and int(sha, 16) >= 0
    # same inputs, key order and int/float spelling do not matter
    assert prompt_sha(m, "model-a", {"temperature": 0.0, "max_new_tokens": 48}) == sha
    assert prompt_sha([dict(x) for x in m], "model-a", {"max_new_tokens": 48.0, "temperature": 0}) == sha
    # anything that changes the output changes the key
    assert prompt_sha(m, "model-b", {"max_new_tokens": 48, "temperature": 0}) != sha
    assert prompt_sha(m, "model-a", {"max_new_tokens": 49, "temperature": 0}) != sha
    assert prompt_sha(m, "model-a", {"max_new_tokens": 48, "temperature": 0.7}) != sha
    assert prompt_sha(build_fusion_messages(["A blue car."], tags=["car"]), "model-a", {"max_new_tokens": 48, "temperature": 0}) != sha
    with pytest.raises(TypeError):
        prompt_sha(m, "model-a", {"x": object()})


def test_a_concise_caption_changes_the_prompt_and_its_absence_does_not():
    """No captioner (or a failed caption) gives the very prompt of a run without one, so its cached fusion is reused."""
    texts, tags, params = ["A red car parked on a street."], ["car"], {"max_new_tokens": 48, "temperature": 0}
    without = build_fusion_messages(texts, None, tags)
    assert build_fusion_messages(texts, "", tags) == build_fusion_messages(texts, " \n", tags) == without
    with_caption = build_fusion_messages(texts, "a red  car", tags)
    assert (
        with_caption[1]["content"]
        == "Retrieved real texts:\n1. A red car parked on a street.\n\nConcise caption: a red car\n\nTags: car\n\nCaption:"
    )
    assert prompt_sha(with_caption, "m", params) != prompt_sha(without, "m", params)
    assert "one short, factual sentence" in DEFAULT_CONCISE_CAPTION_PROMPT


# ---------------------------------------------------------------- clean_caption


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  A dog on a beach.  ", "A dog on a beach."),
        ('"A dog on a beach."', "A dog on a beach."),
        ("Caption: A dog on a beach.", "A dog on a beach."),
        ('Synthetic caption: "A dog\non a beach."', "A dog on a beach."),
        ("Here is the fused caption: \u201cA dog on a beach.\u201d", "A dog on a beach."),
        ("A dog on a beach.\n\nNote: I used the tags.", "A dog on a beach."),
        ('"Open" sign on a "shop" door.', '"Open" sign on a "shop" door.'),
        ("Description of the scene is hard.", "Description of the scene is hard."),
        ('The image caption is: "A dog on a beach."', "A dog on a beach."),
        ("The caption is:", ""),
        ("The caption is great.", "The caption is great."),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


# ---------------------------------------------------------------- cache


class CountingBackend(GenerationBackend):
    """Test double: answers with the last user message upper-cased and records every batch."""

    model_id = "counting"

    def __init__(self, empty_for: str | None = None):
        self.batches: list[int] = []
        self.empty_for = empty_for

    def generate(self, batch, max_new_tokens, temperature):
        self.batches.append(len(batch))
        out = []
        for messages in batch:
            text = messages[-1]["content"]
            out.append("" if self.empty_for and self.empty_for in text else text.upper())
        return out


def _items(texts):
    return [(f"img{i}", build_fusion_messages([t])) for i, t in enumerate(texts)]


def test_generate_with_cache_generates_only_missing_and_round_trips_table():
    params = {"max_new_tokens": 16, "temperature": 0.0}
    backend = CountingBackend()
    assert isinstance(backend, GenerationBackend)
    cache = CaptionCache.from_table(None)
    items = _items(["one sentence here", "two sentence here", "three sentence here"])
    captions, n_cached, n_generated = generate_with_cache(items, backend, cache, None, params, batch_size=2)
    assert (n_cached, n_generated) == (0, 3)
    assert backend.batches == [2, 1]
    assert captions[0] == items[0][1][-1]["content"].upper()
    assert len(cache) == 3

    table = cache.to_table()
    assert table.schema == CACHE_SCHEMA
    assert table.column("model").to_pylist() == ["counting"] * 3
    assert table.column("prompt_sha").to_pylist()[1] == prompt_sha(items[1][1], "counting", params)

    # a rerun from the persisted table generates nothing
    reloaded = CaptionCache.from_table(table)
    backend2 = CountingBackend()
    again, n_cached, n_generated = generate_with_cache(items, backend2, reloaded, "counting", params, batch_size=2)
    assert (again, n_cached, n_generated) == (captions, 3, 0)
    assert backend2.batches == []

    # a new param changes the key, so everything is generated again
    _, n_cached, n_generated = generate_with_cache(items, backend2, reloaded, "counting", {**params, "temperature": 0.5}, batch_size=8)
    assert (n_cached, n_generated) == (0, 3)
    assert backend2.batches == [3]


def test_generate_with_cache_dedups_and_does_not_cache_empty_outputs():
    params = {"max_new_tokens": 16, "temperature": 0.0}
    same = build_fusion_messages(["a cat sleeping"])
    items = [("a", same), ("a", same), ("b", build_fusion_messages(["nothing useful"]))]
    backend = CountingBackend(empty_for="nothing useful")
    cache = CaptionCache()
    captions, n_cached, n_generated = generate_with_cache(items, backend, cache, None, params, batch_size=8)
    assert n_generated == 2 and n_cached == 0
    assert captions[0] == captions[1] != ""
    assert captions[2] == ""
    assert len(cache) == 1  # the empty one is retried next run
    _, n_cached, n_generated = generate_with_cache(items, backend, cache, None, params, batch_size=8)
    assert (n_cached, n_generated) == (2, 1)


def test_generate_with_cache_rejects_wrong_output_count():
    class Short(CountingBackend):
        def generate(self, batch, max_new_tokens, temperature):
            return ["x"]

    with pytest.raises(RuntimeError, match="returned 1 captions for 2 prompts"):
        generate_with_cache(_items(["p one two", "p three four"]), Short(), CaptionCache(), None, {"max_new_tokens": 4}, 8)


def test_cache_from_table_later_rows_win_and_missing_columns_error():
    table = pa.table(
        {
            "image_id": ["x", "x", "y"],
            "prompt_sha": ["s", "s", "t"],
            "synthetic_caption": ["old", "new", None],
            "model": ["m", "m", "m"],
        }
    )
    cache = CaptionCache.from_table(table)
    assert cache.get("x", "s") == "new"
    assert cache.get("y", "t") is None and len(cache) == 1
    with pytest.raises(ValueError, match="lacks columns"):
        CaptionCache.from_table(pa.table({"image_id": ["x"]}))


def _cache_rows(pairs):
    cache = CaptionCache()
    for image_id, caption in pairs:
        cache.put(image_id, "sha", caption, "m")
    return cache


def test_cache_store_appends_parts_and_later_parts_win(tmp_path):
    import pyarrow.parquet as pq

    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    store = CaptionCacheStore(storage, "s1")
    assert store.load().to_table().num_rows == 0 and store.parts() == []
    cache = store.load()
    cache.put("a", "sha", "first a", "m")
    cache.put("b", "sha", "b", "m")
    assert store.append(cache) == 2
    cache.put("a", "sha", "second a", "m")
    assert store.append(cache) == 1  # only what is new: a part never repeats older rows
    assert store.append(cache) == 0 and store.parts() == [0, 1]
    part1 = storage.read_file("_cache/synthetic_captions/s1/part-000001.parquet")
    assert pq.read_table(pa.BufferReader(part1)).num_rows == 1
    reloaded = CaptionCacheStore(storage, "s1").load()
    assert (reloaded.get("a", "sha"), reloaded.get("b", "sha"), len(reloaded)) == ("second a", "b", 2)
    assert reloaded.take_new().num_rows == 0  # loaded rows are not new
    # A second store continues the numbering after the stored parts.
    again = CaptionCacheStore(storage, "s1")
    more = again.load()
    more.put("c", "sha", "c", "m")
    again.append(more)
    assert again.parts() == [0, 1, 2]


def test_cache_store_compacts_past_max_parts_and_reads_the_legacy_file(tmp_path):
    import io

    import pyarrow.parquet as pq

    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    legacy = io.BytesIO()
    pq.write_table(_cache_rows([("old", "from the single-file cache"), ("a", "legacy a")]).to_table(), legacy)
    storage.write_file("_cache/synthetic_captions/s1.parquet", legacy.getvalue())
    store = CaptionCacheStore(storage, "s1", max_parts=3)
    cache = store.load()
    assert cache.get("a", "sha") == "legacy a"
    for i in range(3):
        cache.put(f"x{i}", "sha", f"x{i}", "m")
        cache.put("a", "sha", f"a{i}", "m")
        store.append(cache)
    assert store.parts() == [0, 1, 2] and storage.exists("_cache/synthetic_captions/s1.parquet")
    cache.put("x3", "sha", "x3", "m")
    store.append(cache)  # a fourth part: more than max_parts, so everything is merged into one
    assert store.parts() == [4] and not storage.exists("_cache/synthetic_captions/s1.parquet")
    merged = CaptionCacheStore(storage, "s1").load()
    assert len(merged) == 6 and merged.get("a", "sha") == "a2" and merged.get("old", "sha") == "from the single-file cache"
    # A crash after writing the merged part but before deleting the parts it replaces loads the same.
    cache.put("y", "sha", "y", "m")
    store.append(cache)
    before = CaptionCacheStore(storage, "s1").load().to_table().sort_by("image_id")
    store._write_part(CaptionCacheStore(storage, "s1").load().to_table())
    assert store.parts() == [4, 5, 6]
    assert CaptionCacheStore(storage, "s1").load().to_table().sort_by("image_id").equals(before)
    store.compact()
    assert store.parts() == [7] and CaptionCacheStore(storage, "s1").load().to_table().sort_by("image_id").equals(before)


def test_generate_captions_appends_only_new_captions_and_retries_empty_ones(tmp_path):
    import pyarrow.parquet as pq

    from realsyn import layout
    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.stages.caption import generate_captions
    from realsyn.stages.common import write_retrievals
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    texts = [[f"sentence number {i}"] for i in range(20)]
    texts[5] = ["nothing useful"]
    write_retrievals(
        storage,
        {
            "s1": pa.table(
                {
                    "image_id": [f"img{i}" for i in range(20)],
                    "sentence_ids": [[f"s{i}"] for i in range(20)],
                    "texts": texts,
                    "scores": pa.array([[1.0]] * 20, pa.list_(pa.float32())),
                },
                schema=layout.RETRIEVAL_SCHEMA,
            ),
        },
    )
    stats = generate_captions(storage, "s1", CountingBackend(empty_for="nothing useful"), batch_size=2)
    assert (stats.counts["generated"], stats.counts["cached"]) == (20, 0)
    store = CaptionCacheStore(storage, "s1")
    assert store.parts() == list(range(10))  # one part per batch_size (2) completions, none rewritten
    sizes = [pq.read_table(pa.BufferReader(storage.read_file(store.part_rel(n)))).num_rows for n in store.parts()]
    assert sizes == [2, 2, 1] + [2] * 7  # the empty caption (img5, third batch) is not cached
    backend = CountingBackend()
    stats = generate_captions(storage, "s1", backend, batch_size=2)
    assert (stats.counts["generated"], stats.counts["cached"]) == (1, 19) and backend.batches == [1]  # only the empty one again
    assert store.parts() == list(range(11))
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=2)
    assert (stats.counts["generated"], stats.counts["cached"]) == (0, 20) and store.parts() == list(range(11))


# ---------------------------------------------------------------- tagging


def test_default_vocabulary_is_shipped():
    vocab = load_default_vocabulary()
    assert len(vocab) >= 300
    assert len(set(vocab)) == len(vocab)
    assert {"dog", "beach", "car", "mountain", "pizza"} <= set(vocab)


def test_mine_tags_by_document_frequency():
    sentences = [
        "The dog runs on the beach and the dog barks.",
        "A dog sleeps near the lighthouse.",
        "The lighthouse stands on the beach quickly.",
        "Sunset over the beach.",
        None,
    ]
    assert mine_tags(sentences, top_n=10, min_count=2) == ["beach", "dog", "lighthouse"]
    assert mine_tags(sentences, top_n=1, min_count=1) == ["beach"]
    assert merge_vocabularies(["Dog", "cat"], ["dog", "lighthouse"]) == ["dog", "cat", "lighthouse"]


def _fake_text_embedder(vocab_vectors):
    def embed(texts):
        return np.stack([vocab_vectors[t.removeprefix("a photo of ")] for t in texts]).astype(np.float32)

    return embed


def test_clip_vocabulary_tagger_with_known_embeddings():
    vectors = {
        "dog": np.array([1.0, 0.0, 0.0, 0.0]),
        "beach": np.array([0.0, 2.0, 0.0, 0.0]),  # norm 2: normalised inside
        "car": np.array([0.0, 0.0, 1.0, 0.0]),
        "cat": np.array([0.6, 0.0, 0.0, 0.8]),
    }
    tagger = ClipVocabularyTagger(vocabulary=["dog", "beach", "car"], top_k=2, extra_tags=["cat", "dog"])
    assert tagger.vocabulary == ["dog", "beach", "car", "cat"]
    tagger.fit(_fake_text_embedder(vectors))
    images = np.array(
        [
            [0.5, 0.8, 0.0, 0.0],  # beach 0.848, dog 0.530, cat 0.318
            [0.0, 0.0, 3.0, 0.1],  # car, then cat (0.8*0.1/|img|)
            [0.0, 0.0, 0.0, 0.0],  # invalid image
            [0.6, 0.0, 0.0, 0.8],  # exactly cat, then dog
        ],
        dtype=np.float32,
    )
    assert tagger.tags(images) == [["beach", "dog"], ["car", "cat"], [], ["cat", "dog"]]
    scores = tagger.scores(images)
    np.testing.assert_allclose(scores[0], [0.5 / np.sqrt(0.89), 0.8 / np.sqrt(0.89), 0.0, 0.3 / np.sqrt(0.89)], atol=1e-6)
    np.testing.assert_allclose(scores[3], [0.6, 0.0, 0.0, 1.0], atol=1e-6)
    assert np.isnan(scores[2]).all()

    strict = ClipVocabularyTagger(vocabulary=["dog", "beach", "car", "cat"], top_k=3, min_score=0.5).fit(_fake_text_embedder(vectors))
    assert strict.tags(images) == [["beach", "dog"], ["car"], [], ["cat", "dog"]]


def test_clip_vocabulary_tagger_errors():
    tagger = ClipVocabularyTagger(vocabulary=["dog"])
    with pytest.raises(RuntimeError, match="fit"):
        tagger.tags(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="returned shape"):
        tagger.fit(lambda texts: np.ones((2, 3), np.float32))
    tagger.fit(lambda texts: np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        tagger.tags(np.ones((1, 2), np.float32))


# ---------------------------------------------------------------- transformers backend (embedded SmolLM2)


def test_transformers_backend_generates_deterministic_batched_captions():
    import torch

    torch.set_num_threads(1)
    from realsyn.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(device="cpu", batch_size=2)
    assert backend.model_id == "embedded:smollm2-135m-instruct"
    prompts = [
        build_fusion_messages(
            ["A brown dog runs across a grassy park chasing a red ball.", "Our dog Max loves playing fetch."],
            tags=["dog", "ball", "grass"],
        ),
        build_fusion_messages(["The Eiffel Tower lit up at night over the Seine river."], tags=["tower", "night"]),
    ]
    batched = backend.generate(prompts, max_new_tokens=20, temperature=0.0)
    assert len(batched) == 2 and all(c.strip() for c in batched)
    assert batched != [batched[0], batched[0]]
    assert backend.generate(prompts, max_new_tokens=20, temperature=0.0) == batched
    # Left padding with an attention mask leaves greedy decoding of each prompt unchanged here.
    single = [backend.generate([p], max_new_tokens=20, temperature=0.0)[0] for p in prompts]
    assert single == batched

    sampled = backend.generate(prompts, max_new_tokens=8, temperature=0.8)
    assert backend.generate(prompts, max_new_tokens=8, temperature=0.8) == sampled  # reseeded per call
    assert backend.generate([], max_new_tokens=8) == []
    with pytest.raises(ValueError):
        backend.generate(prompts, max_new_tokens=0)


@pytest.mark.gpu
def test_transformers_backend_on_cuda_matches_batched_and_single():
    from realsyn.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(device="cuda", batch_size=4)
    model, _ = backend._loaded()
    assert model.device.type == "cuda"
    prompts = [build_fusion_messages([f"A photo of {n} red apples on a wooden table."], tags=["apple", "table"]) for n in (2, 3, 5)]
    batched = backend.generate(prompts, max_new_tokens=16, temperature=0.0)
    assert len(batched) == 3 and all(c.strip() for c in batched)
    assert backend.generate(prompts, max_new_tokens=16, temperature=0.0) == batched

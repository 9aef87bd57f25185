"""Perplexity scorer (embedded SmolLM2), the RealSyn perplexity band filter and the POINTS sampler."""

import math

import numpy as np
import pyarrow as pa
import pytest

from realsyn.curation.perplexity import CausalLMPerplexityScorer
from realsyn.filters.base import apply_filters
from realsyn.filters.perplexity_band import EMBEDDED_SCORER_BAND, PerplexityBandFilter
from realsyn.plugins import build_plugin
from realsyn.samplers.points import PointsPerplexitySampler, tie_break_keys

FLUENT = [
    "A man is riding a horse along the beach.",
    "Two children are playing with a red ball in the park.",
    "The cat is sleeping on a soft blanket near the window.",
    "She poured a cup of hot coffee for her friend.",
    "A large airplane is flying over the city at sunset.",
    "The old bridge crosses a wide river in the valley.",
    "He opened the door and walked into the kitchen.",
    "A group of people are waiting for the bus in the rain.",
    "The dog ran across the field to catch the stick.",
    "There are fresh vegetables and fruit on the wooden table.",
]


def shuffled_words(text: str, seed: int) -> str:
    words = text.split()
    rng = np.random.default_rng(seed)
    while True:
        out = [words[i] for i in rng.permutation(len(words))]
        if out != words:
            return " ".join(out)


SHUFFLED = [shuffled_words(t, seed) for seed, t in enumerate(FLUENT)]


@pytest.fixture(scope="module")
def scorer():
    return CausalLMPerplexityScorer(device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def fluent_and_shuffled_scores(scorer):
    scores = scorer.score(FLUENT + SHUFFLED)
    return scores[: len(FLUENT)], scores[len(FLUENT) :]


# ---- scorer on the embedded SmolLM2 ----------------------------------------------------------


def test_fluent_sentences_score_lower_than_their_shuffled_words(fluent_and_shuffled_scores):
    fluent, shuffled = fluent_and_shuffled_scores
    assert fluent.dtype == np.float32 and shuffled.dtype == np.float32
    assert np.all(np.isfinite(fluent)) and np.all(np.isfinite(shuffled))
    assert np.all(fluent >= 1.0)
    assert np.all(fluent < shuffled), list(zip(fluent, shuffled))
    assert np.median(shuffled / fluent) > 2.0


def test_batched_scores_equal_one_by_one(scorer, fluent_and_shuffled_scores):
    single = CausalLMPerplexityScorer(device="cpu", batch_size=1)
    one_by_one = single.score(FLUENT[:5] + SHUFFLED[:5])
    batched = np.concatenate([fluent_and_shuffled_scores[0][:5], fluent_and_shuffled_scores[1][:5]])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4)


def test_scores_are_deterministic_and_independent_of_order(scorer, fluent_and_shuffled_scores):
    again = scorer.score(FLUENT)
    np.testing.assert_array_equal(again, fluent_and_shuffled_scores[0])
    reversed_scores = CausalLMPerplexityScorer(device="cpu", batch_size=3).score(FLUENT[::-1])
    np.testing.assert_allclose(reversed_scores[::-1], fluent_and_shuffled_scores[0], rtol=1e-4)


def test_empty_and_non_text_score_nan(scorer):
    scores = scorer.score(["", "   ", None, 42, FLUENT[0]])
    assert scores.shape == (5,)
    assert np.all(np.isnan(scores[:4]))
    np.testing.assert_allclose(scores[4], scorer.score([FLUENT[0]])[0], rtol=1e-4)
    assert scorer.score([]).shape == (0,)


def test_score_matches_a_direct_computation_with_start_token_and_truncation(scorer):
    """exp(mean NLL) of the text tokens after <|endoftext|>, the first max_length - 1 tokens only."""
    import torch

    model, tokenizer = scorer._load()
    text = FLUENT[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 7
    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for max_length, n_text_tokens in [(128, len(ids)), (8, 7)]:
        seq = torch.tensor([[start] + ids[:n_text_tokens]])
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), dim=-1)
        nll = -log_probs[torch.arange(n_text_tokens), seq[0, 1:]]
        expected = math.exp(float(nll.mean()))
        got = CausalLMPerplexityScorer(device="cpu", max_length=max_length).score([text])[0]
        assert got == pytest.approx(expected, rel=1e-4)


def test_without_start_token_the_first_token_is_context_only(scorer):
    no_bos = CausalLMPerplexityScorer(device="cpu", add_bos=False)
    one_token = no_bos.score(["Hello"])  # a single token has nothing to predict
    assert np.isnan(one_token[0])
    assert no_bos.score([FLUENT[0]])[0] != scorer.score([FLUENT[0]])[0]


def test_unknown_start_token_is_rejected_and_model_id_is_the_name():
    scorer = CausalLMPerplexityScorer(bos_token="<|no-such-token|>", device="cpu")
    assert scorer.model_id == "embedded:smollm2-135m-instruct"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        scorer.score([FLUENT[0]])
    with pytest.raises(ValueError):
        CausalLMPerplexityScorer(batch_size=0)


def test_a_model_saved_to_a_local_directory_scores_by_path(tmp_path, scorer, save_small_random_llama):
    """A 1-layer random Llama saved to tmp_path and scored by path: exp(mean NLL) after the tokenizer's BOS."""
    import torch

    _, tokenizer = scorer._load()
    saved = save_small_random_llama(tmp_path / "tiny-llama", tokenizer, seed=7)
    by_path = CausalLMPerplexityScorer(model=str(tmp_path / "tiny-llama"), device="cpu", batch_size=2)
    assert by_path.model_id == str(tmp_path / "tiny-llama")
    got = by_path.score(FLUENT[:3] + [""])
    for text, value in zip(FLUENT[:3], got):
        seq = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            log_probs = torch.log_softmax(saved(input_ids=seq).logits[0, :-1].float(), dim=-1)
        nll = -log_probs[torch.arange(seq.shape[1] - 1), seq[0, 1:]]
        assert value == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert np.isnan(got[3])
    assert got[0] > 1000  # random weights over a 49k vocabulary: nowhere near the real model's scores


def test_missing_model_directory_fails_in_one_line_and_production_names_a_path(tmp_path, monkeypatch):
    from realsyn.models.paths import ModelNotFoundError
    from resources import build_resources

    missing = tmp_path / "smollm2-135m-instruct"
    with pytest.raises(ModelNotFoundError) as err:
        CausalLMPerplexityScorer(model=str(missing), device="cpu").score(["a red boat"])
    assert str(err.value) == (
        f"perplexity scorer: model directory '{missing}' does not exist; mount it there (production: the /models volume)"
        " or set perplexity.params.model to a local directory"
    )
    monkeypatch.delenv("REALSYN_PPL_MODEL", raising=False)
    params = build_resources("production", input_uri="s3://b/in", storage_root="s3://b/out")["perplexity"].params
    assert params["model"] == "/models/smollm2-135m-instruct"


# ---- band filter -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item, reason",
    [
        ({"perplexity": 0.0}, "perplexity_below_band"),
        ({"perplexity": 29.999}, "perplexity_below_band"),
        ({"perplexity": 30.0}, None),
        ({"perplexity": 30}, None),
        ({"perplexity": 115.5}, None),
        ({"perplexity": np.float32(199.9)}, None),
        ({"perplexity": 200.0}, None),
        ({"perplexity": 200.001}, "perplexity_above_band"),
        ({"perplexity": float("inf")}, "perplexity_above_band"),
        ({"perplexity": float("nan")}, "perplexity_missing"),
        ({"perplexity": np.float32("nan")}, "perplexity_missing"),
        ({"perplexity": None}, "perplexity_missing"),
        ({"perplexity": "50"}, "perplexity_missing"),
        ({"perplexity": True}, "perplexity_missing"),
        ({"text": "no score"}, "perplexity_missing"),
        ("not a dict", "perplexity_missing"),
    ],
)
def test_band_filter_reasons_with_paper_band(item, reason):
    assert PerplexityBandFilter().reasons([item]) == [reason]


def test_band_filter_custom_band_key_and_plugin():
    band = PerplexityBandFilter(low=10, high=20, score_key="ppl")
    assert band.name == "perplexity_band"
    items = [{"ppl": 9.99}, {"ppl": 10}, {"ppl": 20}, {"ppl": 20.5}, {"perplexity": 15}]
    assert band.reasons(items) == [
        "perplexity_below_band",
        None,
        None,
        "perplexity_above_band",
        "perplexity_missing",
    ]
    keep, reasons = apply_filters([band], items)
    assert keep.tolist() == [False, True, True, False, False]
    assert reasons[0] == "perplexity_below_band"


def test_band_filter_rejects_bad_bands():
    with pytest.raises(ValueError):
        PerplexityBandFilter(low=200, high=30)
    with pytest.raises(ValueError):
        PerplexityBandFilter(low=float("nan"))
    low, high = EMBEDDED_SCORER_BAND
    assert 1.0 <= low < high


# ---- POINTS sampler --------------------------------------------------------------------------


def synthetic_table(n: int = 1000) -> pa.Table:
    """Integer-valued scores (many ties) with every 100th score nan: 990 valid."""
    rng = np.random.default_rng(7)
    scores = rng.integers(1, 40, size=n).astype(np.float32)
    scores[::100] = np.nan
    return pa.table({"text_perplexity": scores, "image_id": [f"doc{i // 3}#{i % 3}" for i in range(n)]})


def split(table: pa.Table, sizes: list[int]) -> list[pa.Table]:
    assert sum(sizes) == table.num_rows
    out, start = [], 0
    for size in sizes:
        out.append(table.slice(start, size))
        start += size
    return out


def select_all(sampler, batches, state) -> np.ndarray:
    return np.concatenate([sampler.select(b, state) for b in batches])


def test_points_keeps_exactly_the_lowest_fraction_across_uneven_batches():
    table = synthetic_table()
    scores = table.column("text_perplexity").to_numpy()
    sampler = PointsPerplexitySampler(keep_fraction=0.2)
    assert sampler.name == "points_perplexity"
    assert sampler.required_columns == ("text_perplexity", "image_id")
    batches = split(table, [1, 7, 0, 333, 659])
    state = sampler.fit(iter(batches))
    assert int(state["n_valid"][0]) == 990
    assert int(state["keep_count"][0]) == 198
    assert all(v.size == 1 for v in state.values())
    keep = select_all(sampler, batches, state)
    assert keep.sum() == 198
    assert sampler.stats.counts == {
        "fit_rows": 1000,
        "fit_missing_score": 10,
        "selected": 198,
        "dropped_perplexity_missing": 10,
        "dropped_perplexity_above_points_cut": 792,
    }
    kept, dropped = scores[keep], scores[~keep & ~np.isnan(scores)]
    assert kept.max() <= dropped.min()
    assert kept.max() == np.sort(scores[~np.isnan(scores)])[197] == state["threshold_perplexity"][0]
    # The cut falls inside a run of tied scores, so the id hash decides among them.
    assert (scores == kept.max()).sum() > (kept == kept.max()).sum()


def test_points_selection_is_independent_of_batching_and_batch_order():
    table = synthetic_table()
    sampler = PointsPerplexitySampler(keep_fraction=0.2)
    state_a = sampler.fit(split(table, [500, 500]))
    state_b = sampler.fit(split(table, [13, 987])[::-1])
    assert state_a.keys() == state_b.keys()
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    keep_a = select_all(sampler, split(table, [1000]), state_a)
    keep_b = select_all(sampler, split(table, [3, 97, 400, 250, 250]), state_b)
    np.testing.assert_array_equal(keep_a, keep_b)


def test_points_never_keeps_nan_or_null_scores():
    table = synthetic_table()
    scores = table.column("text_perplexity").to_numpy()
    everything = PointsPerplexitySampler(keep_fraction=1.0)
    state = everything.fit([table])
    keep = everything.select(table, state)
    np.testing.assert_array_equal(keep, ~np.isnan(scores))
    nulls = pa.table({"text_perplexity": pa.array([None, 5.0, None], pa.float64()), "image_id": ["a", "b", "c"]})
    state = everything.fit([nulls])
    assert everything.select(nulls, state).tolist() == [False, True, False]
    assert everything.reasons(nulls, state) == ["perplexity_missing", None, "perplexity_missing"]


def test_points_rounding_empty_and_zero_fraction():
    table = pa.table({"text_perplexity": np.array([5, 1, 4, 2, 3], np.float32), "image_id": list("abcde")})
    half = PointsPerplexitySampler(keep_fraction=0.5)  # 2.5 rounds half up to 3
    state = half.fit([table])
    assert half.select(table, state).tolist() == [False, True, False, True, True]
    cut = "perplexity_above_points_cut"
    assert half.reasons(table, state) == [cut, None, cut, None, None]
    none = PointsPerplexitySampler(keep_fraction=0.0)
    assert not none.select(table, none.fit([table])).any()
    empty_state = half.fit([])
    assert int(empty_state["keep_count"][0]) == 0
    assert np.isnan(empty_state["threshold_perplexity"][0])
    assert not half.select(table, empty_state).any()
    with pytest.raises(ValueError):
        PointsPerplexitySampler(keep_fraction=1.5)
    assert isinstance(build_plugin("sampler", "points_perplexity"), PointsPerplexitySampler)


def test_tie_break_keys_are_fixed_per_id():
    keys = tie_break_keys(["doc1#0", "doc1#0", "doc2#0", None, ""])
    assert keys.dtype == np.uint32
    assert keys[0] == keys[1] != keys[2]
    assert keys[3] == keys[4]
    # Pinned values (blake2b, 4 bytes, little endian): stored states must stay valid across versions.
    assert keys[0] == 421391537 and keys[2] == 162736822


# ---- stage: each distinct text of a shard is scored once -----------------------------------------


class _CountingScorer:
    model_id = "counting"

    def __init__(self):
        self.calls: list[list] = []

    def score(self, texts):
        self.calls.append(list(texts))
        return np.array([float(len(t)) + 0.5 if t else np.nan for t in texts], dtype=np.float32)


def test_stage_scores_each_distinct_text_once_and_broadcasts(tmp_path):
    from realsyn import layout
    from realsyn.stages.filter import score_sentence_perplexity
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    texts = ["A dog runs.", "A cat sits.", "A dog runs.", "", "A dog runs.", "A cat sits.", "Birds."]
    table = pa.table({"sentence_id": [f"s{i}" for i in range(7)], "text": texts})
    with storage.writer(layout.SENTENCE_CANDIDATES, "a") as w:
        w.write_parquet(layout.SENTENCES_FILE, table)
    scorer = _CountingScorer()
    stats = score_sentence_perplexity(storage, "a", scorer)
    assert scorer.calls == [["A dog runs.", "A cat sits.", "", "Birds."]]  # first-occurrence order
    out = storage.reader(layout.SENTENCE_PERPLEXITY, "a").read_parquet(layout.SENTENCES_FILE)
    assert out.column_names == ["sentence_id", "text", "perplexity", "perplexity_model"]
    assert out.select(["sentence_id", "text"]).equals(table)
    # the same scores as scoring every row
    np.testing.assert_array_equal(out.column("perplexity").to_numpy(), _CountingScorer().score(texts))
    assert out.column("perplexity_model").to_pylist() == ["counting"] * 7
    assert stats.as_dict()["rows_scored"] == 4 and stats.as_dict()["duplicates_not_rescored"] == 3
    stats = score_sentence_perplexity(storage, "a", None)
    assert stats.as_dict()["rows_scored"] == 0
    stored = storage.reader(layout.SENTENCE_PERPLEXITY, "a").read_parquet(layout.SENTENCES_FILE)
    assert np.isnan(stored.column("perplexity").to_numpy()).all()


def test_stage_scores_with_the_real_scorer_match_row_by_row(tmp_path, scorer):
    from realsyn import layout
    from realsyn.stages.filter import score_sentence_perplexity
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    texts = FLUENT[:4] + FLUENT[:2] + SHUFFLED[:2] + SHUFFLED[:1]
    with storage.writer(layout.SENTENCE_CANDIDATES, "a") as w:
        w.write_parquet(layout.SENTENCES_FILE, pa.table({"sentence_id": [str(i) for i in range(len(texts))], "text": texts}))
    stats = score_sentence_perplexity(storage, "a", scorer)
    got = storage.reader(layout.SENTENCE_PERPLEXITY, "a").read_parquet(layout.SENTENCES_FILE).column("perplexity").to_numpy()
    np.testing.assert_allclose(got, scorer.score(texts), rtol=1e-4)  # batches differ, so float noise only
    assert stats.as_dict()["rows_scored"] == 6 and stats.as_dict()["duplicates_not_rescored"] == 3

import numpy as np
import pytest

from realsyn.similarity import DEFAULT_BANDS, band_reasons, default_band, pair_cosine


def test_default_band_only_for_the_calibrated_model():
    assert DEFAULT_BANDS == {"EVA02-E-14-plus": (0.51, 0.61)}
    assert default_band("EVA02-E-14-plus/laion2b_s9b_b144k", False) == (0.51, 0.61)
    assert default_band("EVA02-E-14-plus", False) == (0.51, 0.61)
    assert default_band("EVA02-E-14-plus/laion2b_s9b_b144k", True) is None
    assert default_band("ViT-B-32/openai", False) is None
    assert default_band("EVA02-L-14/merged2b_s4b_b131k", False) is None


def test_pair_cosine_row_wise():
    img = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    txt = np.array([[2.0, 0.0], [4.0, 3.0], [-1.0, -1.0], [1.0, 0.0]], dtype=np.float32)
    got = pair_cosine(img, txt)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:3], [1.0, 0.96, -1.0], atol=1e-7)
    assert np.isnan(got[3])
    with pytest.raises(ValueError, match="same"):
        pair_cosine(img, txt[:2])


def test_band_reasons_inclusive_bounds():
    sim = np.array([0.50, 0.51, 0.56, 0.61, 0.62, np.nan, -0.2], dtype=np.float32)
    assert band_reasons(sim, 0.51, 0.61) == [
        "similarity_below_band",
        None,
        None,
        None,
        "similarity_above_band",
        "similarity_invalid",
        "similarity_below_band",
    ]
    assert band_reasons(np.array([0.3], dtype=np.float64), -1.0, 1.0) == [None]
    assert band_reasons(np.zeros(0, np.float32), 0.5, 0.6) == []
    with pytest.raises(ValueError):
        band_reasons(sim, 0.7, 0.6)


class _HashTextEmbedder:
    """Deterministic unit vectors per text; counts the texts it embeds."""

    random_weights = False

    def __init__(self, model_id: str = "hash-v1"):
        self.model_id, self.embedded = model_id, []

    def embed_texts(self, texts):
        self.embedded.extend(texts)
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(4) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_filter_pairs_rejudges_committed_scores_and_embeds_only_changed_pairs(tmp_path, monkeypatch):
    import pyarrow as pa

    from realsyn import layout
    from realsyn.stages import caption as stage
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    ids = ["a", "b", "c"]
    emb = np.eye(3, 4, dtype=np.float32)
    monkeypatch.setattr(stage, "kept_image_embeddings", lambda _storage, _shard: (ids, emb))

    def captions(texts):
        with storage.writer(layout.SYNTHETIC_CAPTIONS, "s0") as w:
            w.write_parquet(layout.CAPTIONS_FILE, pa.table({"image_id": ids, "synthetic_caption": texts, "status": ["ok"] * 3}))

    def scores():
        t = storage.reader(layout.FILTERED_PAIRS, "s0").read_parquet(layout.SIMILARITY_FILE)
        return dict(zip(t.column("image_id").to_pylist(), t.column("similarity").to_pylist()))

    captions(["one", "two", "three"])
    first = _HashTextEmbedder()
    stage.filter_pairs(storage, "s0", first, low=-1.0, high=1.0)
    assert first.embedded == ["one", "two", "three"]
    before = scores()

    # a new band: every score reused, nothing embedded, decisions follow the new band
    again = _HashTextEmbedder()
    stats = stage.filter_pairs(storage, "s0", again, low=2.0, high=3.0)
    assert again.embedded == [] and scores() == before
    assert stats.counts["scores_reused"] == 3 and stats.counts["rows_out"] == 0

    # one caption changed: only that pair is embedded again
    captions(["one", "TWO", "three"])
    changed = _HashTextEmbedder()
    stage.filter_pairs(storage, "s0", changed, low=-1.0, high=1.0)
    assert changed.embedded == ["TWO"]
    assert scores()["a"] == before["a"] and scores()["c"] == before["c"]

    # another model: nothing reused
    other = _HashTextEmbedder("hash-v2")
    stage.filter_pairs(storage, "s0", other, low=-1.0, high=1.0)
    assert other.embedded == ["one", "TWO", "three"]

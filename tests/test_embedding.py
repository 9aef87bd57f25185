"""OpenClipEmbedder: offline fallback, load-by-path, failure modes, batching, cache, GPU."""

import io
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from PIL import Image

from realsyn.embedding import open_clip_embedder as oce
from realsyn.embedding.open_clip_embedder import OpenClipEmbedder, WeightsUnavailableError, clear_model_cache
from realsyn.stats import StepStats

TEXTS = ["a dog runs on the beach", "a red car parked outside", "two people eat pizza"]


@pytest.fixture(autouse=True)
def _one_thread_fresh_cache():
    import torch

    torch.set_num_threads(1)
    clear_model_cache()
    yield
    clear_model_cache()


def _jpeg(seed: int, size=(80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _tiny_state_dict_file(tmp_path, seed: int):
    import open_clip
    import torch

    oce.register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("RealSyn-Tiny").eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_offline_fallback_builds_only_the_tiny_model_and_warns(caplog, monkeypatch):
    import open_clip

    built = []
    real_create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: built.append(name) or real_create(name, **kw))
    emb = OpenClipEmbedder(device="cpu")  # EVA02-E-14-plus / laion2b_s9b_b144k
    with caplog.at_level(logging.WARNING, logger="realsyn"):
        vecs = emb.embed_texts(TEXTS)
    assert built == ["RealSyn-Tiny"]  # EVA02-E was never instantiated
    assert any(r.name == "realsyn" and r.levelno == logging.WARNING and "RANDOM" in r.message for r in caplog.records)
    assert emb.random_weights is True
    assert emb.model_id == "RealSyn-Tiny/random-seed0"
    assert emb.dim == 64
    assert vecs.shape == (3, 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-3  # different texts, different vectors

    imgs = emb.embed_images([_jpeg(1), _jpeg(2)])
    assert imgs.shape == (2, 64) and imgs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)


def test_random_fallback_is_deterministic_per_seed():
    first = OpenClipEmbedder(device="cpu", seed=0)
    a_txt, a_img = first.embed_texts(TEXTS), first.embed_images([_jpeg(3)])
    first_model = first._loaded()
    clear_model_cache()  # force a second, independent build
    second = OpenClipEmbedder(device="cpu", seed=0)
    assert second._loaded() is not first_model
    np.testing.assert_array_equal(second.embed_texts(TEXTS), a_txt)
    np.testing.assert_array_equal(second.embed_images([_jpeg(3)]), a_img)
    other = OpenClipEmbedder(device="cpu", seed=1)
    assert other.model_id == "RealSyn-Tiny/random-seed1"
    assert np.abs(other.embed_texts(TEXTS) - a_txt).max() > 1e-3


def test_model_is_cached_per_config():
    a = OpenClipEmbedder(device="cpu", batch_size=4)
    b = OpenClipEmbedder(device="cpu", batch_size=16)
    assert a._loaded() is b._loaded()
    assert OpenClipEmbedder(device="cpu", seed=5)._loaded() is not a._loaded()


def test_load_weights_by_local_path_matches_saved_model(tmp_path):
    import open_clip
    import torch
    import torch.nn.functional as F

    saved, path = _tiny_state_dict_file(tmp_path, seed=123)
    emb = OpenClipEmbedder("RealSyn-Tiny", pretrained=str(path), fallback_model=None, device="cpu")
    assert emb.random_weights is False
    assert emb.model_id == "RealSyn-Tiny/tiny.pt"

    with torch.no_grad():
        want_txt = F.normalize(saved.encode_text(open_clip.get_tokenizer("RealSyn-Tiny")(TEXTS)), dim=-1).numpy()
    np.testing.assert_allclose(emb.embed_texts(TEXTS), want_txt, atol=1e-5)

    _, _, preprocess = open_clip.create_model_and_transforms("RealSyn-Tiny")
    images = [_jpeg(7), _jpeg(8, size=(50, 120))]
    batch = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        want_img = F.normalize(saved.encode_image(batch), dim=-1).numpy()
    np.testing.assert_allclose(emb.embed_images(images), want_img, atol=1e-5)

    # Loaded weights are not the seed-0 random init of the fallback.
    random_tiny = OpenClipEmbedder("RealSyn-Tiny", pretrained=None, device="cpu")
    assert random_tiny.random_weights is True
    assert np.abs(random_tiny.embed_texts(TEXTS) - want_txt).max() > 1e-3


def test_missing_local_path_without_fallback_fails_in_one_line(tmp_path):
    from realsyn.models.paths import ModelNotFoundError

    emb = OpenClipEmbedder("RealSyn-Tiny", pretrained=str(tmp_path / "nope.pt"), fallback_model=None, device="cpu")
    with pytest.raises(ModelNotFoundError) as err:
        emb.embed_texts(TEXTS)
    assert str(err.value) == (
        f"CLIP embedder RealSyn-Tiny: model file '{tmp_path / 'nope.pt'}' does not exist; mount it there"
        " (production: the /models volume) or set embedder.params.pretrained to a local file"
    )
    # a model directory without its weight file names the file it looked for
    (tmp_path / "eva").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"model file '.*/eva/open_clip_model\.safetensors' does not exist"):
        OpenClipEmbedder("RealSyn-Tiny", pretrained=str(tmp_path / "eva"), fallback_model=None, device="cpu").embed_texts(TEXTS)


def test_weights_in_a_model_directory_load_by_path(tmp_path):
    import shutil

    saved, path = _tiny_state_dict_file(tmp_path, seed=321)
    (tmp_path / "tiny-dir").mkdir()
    shutil.copy(path, tmp_path / "tiny-dir" / "open_clip_pytorch_model.bin")
    by_file = OpenClipEmbedder("RealSyn-Tiny", pretrained=str(path), fallback_model=None, device="cpu")
    by_dir = OpenClipEmbedder("RealSyn-Tiny", pretrained=str(tmp_path / "tiny-dir"), fallback_model=None, device="cpu")
    assert by_dir.random_weights is False and by_dir.model_id == "RealSyn-Tiny/open_clip_pytorch_model.bin"
    np.testing.assert_array_equal(by_dir.embed_texts(TEXTS), by_file.embed_texts(TEXTS))


def test_production_embedder_is_a_local_file_with_no_fallback(monkeypatch, tmp_path):
    from realsyn.models.paths import ModelNotFoundError
    from resources import build_resources

    monkeypatch.delenv("REALSYN_CLIP_WEIGHTS", raising=False)
    params = build_resources("production", input_uri="s3://b/in", storage_root="s3://b/out")["embedder"].params
    assert params["pretrained"] == "/models/eva02-e-14-plus/open_clip_model.safetensors" and params["fallback_model"] is None
    monkeypatch.setenv("REALSYN_CLIP_WEIGHTS", str(tmp_path / "missing.safetensors"))
    embedder = build_resources("production", input_uri="s3://b/in", storage_root="s3://b/out")["embedder"]
    with pytest.raises(ModelNotFoundError, match="^CLIP embedder EVA02-E-14-plus: model file .*missing.safetensors' does not exist"):
        OpenClipEmbedder(**{**embedder.resolved_params(), "device": "cpu"}).embed_texts(TEXTS)


def test_tagger_vocabulary_from_a_local_file_or_one_line_error(tmp_path):
    from realsyn.generation.tagging import ClipVocabularyTagger, load_default_vocabulary
    from realsyn.models.paths import ModelNotFoundError

    vocab = tmp_path / "tags.txt"
    vocab.write_text("# RAM++-style list\nDog\ncat\n\ndog\nred boat\n", encoding="utf-8")
    assert ClipVocabularyTagger(vocabulary_path=str(vocab), extra_tags=["lake"]).vocabulary == ["dog", "cat", "red boat", "lake"]
    assert ClipVocabularyTagger().vocabulary == load_default_vocabulary()  # the list shipped in the package
    with pytest.raises(ModelNotFoundError) as err:
        ClipVocabularyTagger(vocabulary_path=str(tmp_path / "ram_tags.txt"))
    assert str(err.value) == (
        f"tagger vocabulary: model file '{tmp_path / 'ram_tags.txt'}' does not exist; mount it there (production: the /models volume)"
        " or set tagger.params.vocabulary_path to a local file"
    )
    with pytest.raises(ValueError, match="not both"):
        ClipVocabularyTagger(vocabulary=["dog"], vocabulary_path=str(vocab))


def test_missing_local_path_falls_back_when_configured(tmp_path, caplog):
    emb = OpenClipEmbedder("EVA02-E-14-plus", pretrained=str(tmp_path / "eva.bin"), device="cpu", seed=2)
    with caplog.at_level(logging.WARNING, logger="realsyn"):
        assert emb.model_id == "RealSyn-Tiny/random-seed2"
    assert "does not exist" in caplog.text
    assert emb.random_weights is True


def test_unknown_or_offline_tag_falls_back_or_raises_in_one_line():
    assert OpenClipEmbedder("RealSyn-Tiny", pretrained="no_such_tag", device="cpu").random_weights is True
    with pytest.raises(WeightsUnavailableError, match="neither a weights file nor a known tag") as err:
        _ = OpenClipEmbedder("ViT-B-32", pretrained="no_such_tag", fallback_model=None, device="cpu").dim
    assert str(err.value).startswith("CLIP embedder ViT-B-32: weights 'no_such_tag' unavailable (")
    assert str(err.value).endswith("set embedder.params.pretrained to a local weights file (production: under /models)")
    with pytest.raises(WeightsUnavailableError, match="^CLIP embedder EVA02-E-14-plus: weights 'laion2b_s9b_b144k' unavailable") as err:
        _ = OpenClipEmbedder(fallback_model=None, device="cpu").dim  # a hub tag under HF_HUB_OFFLINE=1
    assert "\n" not in str(err.value)


def test_bad_rows_become_zero_vectors_and_are_counted():
    emb = OpenClipEmbedder(device="cpu", batch_size=2)
    stats = StepStats("embed")
    imgs = emb.embed_images([_jpeg(1), b"not an image", _jpeg(2)], stats)
    assert np.linalg.norm(imgs, axis=1).round(4).tolist() == [1.0, 0.0, 1.0]
    txts = emb.embed_texts(["a cat", None, "a dog"], stats)
    assert np.linalg.norm(txts, axis=1).round(4).tolist() == [1.0, 0.0, 1.0]
    assert stats.as_dict() == {"dropped_not_text": 1, "dropped_undecodable": 1, "embedded": 4, "seconds": 0.0}


def test_batch_size_does_not_change_embeddings():
    texts = [f"sentence number {i} about a cat" for i in range(7)]
    images = [_jpeg(i) for i in range(5)]
    small = OpenClipEmbedder(device="cpu", batch_size=2)
    want_t, want_i = small.embed_texts(texts), small.embed_images(images)
    big = OpenClipEmbedder(device="cpu", batch_size=32)
    np.testing.assert_allclose(big.embed_texts(texts), want_t, atol=1e-5)
    np.testing.assert_allclose(big.embed_images(images), want_i, atol=1e-5)


@pytest.mark.gpu
def test_embeds_on_cuda_like_on_cpu():
    # conftest skips gpu-marked tests only where CUDA is absent
    cpu = OpenClipEmbedder(device="cpu").embed_texts(TEXTS)
    gpu = OpenClipEmbedder(device="cuda")
    assert gpu._loaded().device == "cuda"
    assert next(gpu._loaded().model.parameters()).is_cuda
    np.testing.assert_allclose(gpu.embed_texts(TEXTS), cpu, atol=1e-3)
    auto = OpenClipEmbedder(device="auto")
    assert auto._loaded().device == "cuda"
    np.testing.assert_allclose(np.linalg.norm(auto.embed_images([_jpeg(1)]), axis=1), 1.0, atol=1e-4)

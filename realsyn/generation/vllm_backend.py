"""Production generation client: an OpenAI-compatible vLLM server (deployed on Kubernetes)."""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import math
import os
import random
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from realsyn.generation.base import PartialBatchError, clean_caption
from realsyn.net import DeadlineHTTPConnection
from realsyn.plugins.kinds import GenerationBackend
from realsyn.redact import redact, strip_userinfo

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The request itself was refused (e.g. prompt longer than the context): that item gets no caption.
REJECTED_STATUS = frozenset({400, 413, 422})
DEFAULT_API_KEY_ENV = "REALSYN_VLLM_API_KEY"
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class VllmRequestError(RuntimeError):
    """The server could not be reached or kept failing; the message names the URL (credentials redacted)."""


class VllmModelNotServedError(VllmRequestError):
    """The server answers but does not serve the configured model (one line: which model, which server, how to fix)."""


class _Secret:
    """Holds a key handed over at run time (a resolved ``dg.EnvVar``): masked in repr, never pickled."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "_Secret(***)"

    def __reduce__(self):
        raise TypeError("an API key is never pickled")


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class VllmOpenAIBackend(GenerationBackend):
    """``POST {base_url}/v1/chat/completions``, up to ``max_concurrency`` requests in flight.

    ``generate_as_completed`` keeps ``max_concurrency`` requests in flight over a whole list of
    prompts (a shard), yielding each completion as it arrives, so the caller's batch size (how often
    the cache is persisted) never limits the server's load. One prompt that keeps failing does not
    stop the others; once ``max_failed_prompts`` have failed for good (a dead server), no new prompt
    is sent: those in flight finish (and are yielded), then the first error is raised.

    429, 5xx, timeouts and connection errors are retried ``retries`` times with exponential backoff
    (honouring Retry-After, clamped to [0, ``max_backoff_s``]); 400/413/422 mark that one prompt as
    rejected (empty caption, logged); any other status fails at once, since it means a wrong URL,
    model or key.

    ``timeout_s`` is one wall-clock deadline per attempt over connect, request, headers and body
    (``realsyn.net``): a server that drips its answer cannot hold a worker past it. The API key is
    never a parameter: ``api_key_env`` names the one environment variable read at request time, so
    no config, snapshot or log holds it; a Dagster resource may instead hand over its resolved
    ``dg.EnvVar`` with ``use_api_key`` (kept out of repr and pickles). ``user:pass@`` in ``base_url``
    is sent as Basic auth (unless a key is set) and never appears in messages.

    Before the first completion, ``GET /v1/models`` is checked once (``verify_model``): a server
    that does not serve ``model`` fails the step with one line naming the model, the server and the
    ``--model``/``--served-model-name`` to start it with, instead of one 404 per prompt. A server
    that cannot be reached yet (still loading its model) is waited for up to ``wait_ready_s``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout_s: float = 120,
        max_concurrency: int = 16,
        retries: int = 3,
        seed: int = 0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        verify_model: bool = True,
        max_failed_prompts: int = 8,
        wait_ready_s: float = 0.0,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if max_failed_prompts < 1:
            raise ValueError(f"max_failed_prompts must be >= 1, got {max_failed_prompts}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        base, userinfo = strip_userinfo(base_url.strip().rstrip("/"))
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got {redact(base_url)!r}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._basic = base64.b64encode(unquote(userinfo).encode()).decode() if userinfo else None
        self.model_id = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.retries = int(retries)
        self.seed = int(seed)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = max(0.0, float(max_backoff_s))
        self.verify_model = bool(verify_model)
        self.max_failed_prompts = int(max_failed_prompts)
        self.wait_ready_s = max(0.0, float(wait_ready_s))
        self.n_rejected = 0
        # client-side load: requests being sent or awaited right now, and the most at once so far
        self.in_flight = 0
        self.peak_in_flight = 0
        self._verified = False
        self._key: _Secret | None = None
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    @property
    def models_url(self) -> str:
        return f"{self.base_url}/v1/models"

    def use_api_key(self, key: str | None) -> None:
        """Use this key instead of reading ``api_key_env`` (a resource's resolved ``dg.EnvVar``); None: read the variable again."""
        self._key = _Secret(key) if key else None

    def _api_key(self) -> str | None:
        if self._key is not None:
            return self._key.value
        return os.environ.get(self.api_key_env) or None

    def redact_text(self, text: object) -> str:
        return redact(text, secrets=[self._api_key(), self._basic])

    def _connection(self) -> DeadlineHTTPConnection:
        # One kept-alive connection per worker thread; a dropped one is replaced.
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.is_dropped():
            conn.close()
            conn = None
        if conn is None:
            conn = DeadlineHTTPConnection(self._scheme, self._host, self._port, op_timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "realsyn/0.1"}
        if has_body:
            headers["Content-Type"] = "application/json"
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        return headers

    def _send(self, method: str, url: str, payload: dict | None) -> _Response:
        """One attempt, all of it (connect, send, headers, body) within ``timeout_s``."""
        body = json.dumps(payload).encode() if payload is not None else None
        conn = self._connection()
        conn.deadline.restart(self.timeout_s)
        try:
            conn.request(method, self._prefix + url[len(self.base_url) :], body=body, headers=self._headers(body is not None))
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
            if len(data) > MAX_RESPONSE_BYTES:
                raise http.client.HTTPException(f"response over {MAX_RESPONSE_BYTES} bytes")
            if response.length:  # http.client returns a body cut short by a dying server as if whole
                raise http.client.IncompleteRead(data, response.length)
            if conn.deadline.expired():
                raise TimeoutError(f"no complete response within {self.timeout_s:g}s")
            if response.will_close:
                conn.close()
            return _Response(response.status, response.headers, data)
        except BaseException:
            conn.close()
            raise

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="vllm")
            return self._executor

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> VllmOpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # the handed-over key stays in this process; an unpickled copy reads api_key_env
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_executor", "_lock", "_key")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local, self._executor, self._lock, self._key = threading.local(), None, threading.Lock(), None

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        wait = parse_retry_after(retry_after)
        if wait is not None:
            return min(max(wait, 0.0), self.max_backoff_s)
        # Jitter spreads the retries of many workers hitting one restarted server.
        return min(self.backoff_s * (2**attempt), self.max_backoff_s) * random.uniform(0.5, 1.0)

    def request(self, method: str, url: str, payload: dict | None = None) -> _Response:
        """Response with a 2xx or rejected status; retries transient failures, raises otherwise."""
        last = ""
        shown = self.redact_text(url)
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = self._send(method, url, payload)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, bad status line
                kind = "Timeout" if isinstance(exc, TimeoutError) else "SSLError" if isinstance(exc, ssl.SSLError) else "ConnectionError"
                last = self.redact_text(f"{kind}: {type(exc).__name__}: {exc}")
            else:
                if response.ok or response.status in REJECTED_STATUS:
                    return response
                last = self.redact_text(f"HTTP {response.status}: {response.text[:300]}")
                if response.status not in RETRY_STATUS:
                    raise VllmRequestError(f"{method} {shown} failed with {last}")
                retry_after = response.headers.get("Retry-After")
            if attempt < self.retries:
                delay = self._delay(attempt, retry_after)
                log.warning("%s %s: %s; retry %d/%d in %.2fs", method, shown, last, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise VllmRequestError(f"{method} {shown} failed after {self.retries + 1} attempts; last error: {last}")

    def _complete(self, messages: list[dict], max_new_tokens: int, temperature: float) -> str:
        payload = {
            "model": self.model_id,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "seed": self.seed,
        }
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response = self.request("POST", self.completions_url, payload)
        finally:
            with self._lock:
                self.in_flight -= 1
        if not response.ok:
            with self._lock:
                self.n_rejected += 1
            log.warning(
                "%s rejected a prompt (HTTP %d): %s",
                self.redact_text(self.completions_url),
                response.status,
                self.redact_text(response.text[:300]),
            )
            return ""
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise VllmRequestError(
                self.redact_text(f"POST {self.completions_url} returned a malformed completion: {response.text[:300]}")
            ) from exc
        return clean_caption(content)

    def ensure_model(self) -> None:
        if not self.verify_model or self._verified:
            return
        deadline = time.monotonic() + self.wait_ready_s
        while True:
            try:
                self.check()
                break
            except VllmModelNotServedError:
                raise
            except VllmRequestError as exc:  # not reachable (yet): a server still loading its model
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.warning("%s not ready (%s); waiting up to %.0fs more", self.redact_text(self.base_url), exc, left)
                time.sleep(min(5.0, left))
        self._verified = True

    def generate_as_completed(
        self, prompts: Sequence[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0
    ) -> Iterator[tuple[int, str]]:
        """(position, caption) per prompt as each completes, ``max_concurrency`` requests in flight.

        Once ``max_failed_prompts`` prompts have failed for good no new one is sent; those in flight
        are still yielded, then the first error is raised (also when fewer failed, after the rest).
        Closing the iterator early cancels nothing already sent.
        """
        if not prompts:
            return
        self.ensure_model()
        pool = self.pool()
        queue = iter(enumerate(prompts))
        in_flight: dict[Future, int] = {}
        error: BaseException | None = None
        n_failed = 0

        def refill() -> None:
            while n_failed < self.max_failed_prompts and len(in_flight) < self.max_concurrency:
                nxt = next(queue, None)
                if nxt is None:
                    return
                in_flight[pool.submit(self._complete, nxt[1], max_new_tokens, temperature)] = nxt[0]

        refill()
        while in_flight:
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            finished: list[tuple[int, str]] = []
            for future in done:
                position = in_flight.pop(future)
                try:
                    finished.append((position, future.result()))
                except Exception as exc:  # noqa: BLE001 - re-raised once the requests in flight are in
                    error, n_failed = error or exc, n_failed + 1
            refill()  # before yielding, so the server stays busy while the caller persists
            yield from sorted(finished)
        if error is not None:
            raise error

    def generate(self, batch: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        if not batch:
            return []
        # a failing prompt never discards the others' completions: they come back in PartialBatchError
        completed: dict[int, str] = {}
        try:
            for position, text in self.generate_as_completed(batch, max_new_tokens, temperature):
                completed[position] = text
        except Exception as exc:
            if not completed:
                raise
            raise PartialBatchError(completed, exc) from exc
        return [completed[i] for i in range(len(batch))]

    def check(self) -> list[str]:
        """Served model ids from ``GET /v1/models``; raises unless this backend's model is among them."""
        response = self.request("GET", self.models_url)
        if not response.ok:
            raise VllmRequestError(self.redact_text(f"GET {self.models_url} failed with HTTP {response.status}: {response.text[:300]}"))
        try:
            served = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise VllmRequestError(
                self.redact_text(f"GET {self.models_url} returned a malformed model list: {response.text[:300]}")
            ) from exc
        if self.model_id not in served:
            raise VllmModelNotServedError(
                self.redact_text(
                    f"{self.base_url} does not serve model {self.model_id!r}; it serves {served}: start vLLM with"
                    f" --model /models/<dir> --served-model-name {self.model_id} (or set the generator's params.model to a served id)"
                )
            )
        return served


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None when absent or garbage.

    Negative, NaN and infinite values come back as they are for the caller to clamp (NaN as None).
    """
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            return None
        return when.timestamp() - time.time()
    return None if math.isnan(seconds) else seconds

"""Production generation client: an OpenAI-compatible vLLM server (deployed on Kubernetes)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from realsyn.generation.base import clean_caption
from realsyn.plugins.kinds import GenerationBackend

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The request itself was refused (e.g. prompt longer than the context): that item gets no caption.
REJECTED_STATUS = frozenset({400, 413, 422})


class VllmRequestError(RuntimeError):
    """The server could not be reached or kept failing; the message names the URL."""


class VllmOpenAIBackend(GenerationBackend):
    """``POST {base_url}/v1/chat/completions``, up to ``max_concurrency`` requests in flight.

    429, 5xx, timeouts and connection errors are retried ``retries`` times with exponential backoff
    (honouring Retry-After); 400/413/422 mark that one prompt as rejected (empty caption, logged);
    any other status fails at once, since it means a wrong URL, model or key.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120,
        max_concurrency: int = 16,
        retries: int = 3,
        seed: int = 0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model_id = model
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.retries = int(retries)
        self.seed = int(seed)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.n_rejected = 0
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    @property
    def models_url(self) -> str:
        return f"{self.base_url}/v1/models"

    def _session(self) -> Any:
        # One session (connection pool) per worker thread: requests.Session is not thread-safe.
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def _pool(self) -> ThreadPoolExecutor:
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

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        # Jitter spreads the retries of many workers hitting one restarted server.
        return min(self.backoff_s * (2**attempt), self.max_backoff_s) * random.uniform(0.5, 1.0)

    def _request(self, method: str, url: str, payload: dict | None = None) -> Any:
        """Response with a 2xx or rejected status; retries transient failures, raises otherwise."""
        import requests

        timeout = (min(10.0, self.timeout_s), self.timeout_s)
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = self._session().request(method, url, json=payload, timeout=timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.ok or response.status_code in REJECTED_STATUS:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise VllmRequestError(f"{method} {url} failed with {last}")
                retry_after = response.headers.get("Retry-After")
            if attempt < self.retries:
                delay = self._delay(attempt, retry_after)
                log.warning("%s %s: %s; retry %d/%d in %.2fs", method, url, last, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise VllmRequestError(f"{method} {url} failed after {self.retries + 1} attempts; last error: {last}")

    def _complete(self, messages: list[dict], max_new_tokens: int, temperature: float) -> str:
        payload = {
            "model": self.model_id,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "seed": self.seed,
        }
        response = self._request("POST", self.completions_url, payload)
        if not response.ok:
            with self._lock:
                self.n_rejected += 1
            log.warning("%s rejected a prompt (HTTP %d): %s", self.completions_url, response.status_code, response.text[:300])
            return ""
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise VllmRequestError(f"POST {self.completions_url} returned a malformed completion: {response.text[:300]}") from exc
        return clean_caption(content)

    def generate(self, batch: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        if not batch:
            return []
        futures = [self._pool().submit(self._complete, m, max_new_tokens, temperature) for m in batch]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # requests not yet started are dropped; the batch fails as a whole
            raise

    def check(self) -> list[str]:
        """Served model ids from ``GET /v1/models``; raises unless this backend's model is among them."""
        response = self._request("GET", self.models_url)
        if not response.ok:
            raise VllmRequestError(f"GET {self.models_url} failed with HTTP {response.status_code}: {response.text[:300]}")
        try:
            served = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise VllmRequestError(f"GET {self.models_url} returned a malformed model list: {response.text[:300]}") from exc
        if self.model_id not in served:
            raise VllmRequestError(f"{self.base_url} does not serve model {self.model_id!r}; it serves {served}")
        return served

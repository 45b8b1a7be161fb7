"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, with every reply kept.

Two benchmarks need one for their official score: MathVista extracts the answer from a free-form
response with an LLM (``mathvista.py``), AMO-Bench grades its description answers with one
(``amo_bench.py``). ``opsd-mm eval --judge-url URL --judge-model NAME [--judge-key-env VAR]``
builds a :class:`Judge`; the benchmark turns a response into :class:`JudgeRequest` s (the
official prompt, sampling and vote index), the runner asks the judge for every request of a
batch at once (:meth:`Judge.ask`: a bounded thread pool over the ``openai`` client, whose own
retries back off exponentially on connection errors, 408, 409, 429 and 5xx), and the scorer
reads the replies from the judge's cache (:meth:`Judge.reply`), never from the network.

Every reply is stored in the sample's score in ``predictions.jsonl`` as ``{"model",
"prompt_sha256", "sample", "reply"}``: a resumed run and ``opsd-mm eval score`` seed the cache
from the records (:meth:`Judge.remember`), so a request is never sent twice and re-scoring is
offline. An endpoint that refuses (HTTP 4xx other than a too-long prompt) or cannot be reached
after the retries stops the run with a one-line :class:`EvalError`; the batch being judged is
generated again on resume (completions are seeded per item, so identically). A prompt longer
than the judge's context is the one per-request failure: its reply is recorded as empty with the
error beside it (``judge_errors`` in the summary), as the official MathVista code returns an
empty extraction after an error.

``openai`` is an optional dependency (``pip install 'opsd-mm[judge]'``), imported when the first
request is sent.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opsd_mm.eval.benchmarks._common import EvalError

DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 4
# An HTTP 400/413 whose message says the prompt does not fit is a per-request failure; any other
# refusal (a wrong key, model or parameter) would fail every request the same way.
_TOO_LONG = re.compile(
    r"context length|too long|too many tokens|reduce the length|longer than the maximum", re.I
)


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class JudgeRequest:
    """One chat completion: the user message, its sampling, and which vote it is (AMO-Bench
    asks the same prompt five times)."""

    prompt: str
    temperature: float
    max_tokens: int
    sample: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return prompt_sha256(self.prompt), self.sample


@dataclass(frozen=True)
class JudgeReply:
    """A stored reply; ``error`` is set (and ``text`` empty) when the endpoint rejected the
    prompt as too long."""

    text: str
    error: str | None = None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Judge:
    """The replies of one judge model, by (prompt hash, sample), and the client that asks for
    missing ones (none without ``url``: offline re-scoring from stored replies only)."""

    def __init__(
        self,
        model: str,
        url: str | None = None,
        *,
        key_env: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_tokens: int | None = None,
    ) -> None:
        if not model:
            raise EvalError("--judge-model must name the judge model")
        if concurrency < 1 or retries < 0 or timeout <= 0 or (max_tokens or 1) < 1:
            raise EvalError(
                f"--judge-concurrency {concurrency} (>= 1), --judge-retries {retries} (>= 0), "
                f"--judge-timeout {timeout} (> 0), --judge-max-tokens {max_tokens} (>= 1): "
                "out of range"
            )
        if key_env is not None and not os.environ.get(key_env):
            raise EvalError(f"--judge-key-env {key_env}: the environment variable is not set")
        self.model, self.url, self.key_env = model, url, key_env
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.max_tokens = max_tokens  # a cap on each benchmark's official budget
        self._replies: dict[tuple[str, int], JudgeReply] = {}
        self._lock = threading.Lock()
        self._client: Any = None
        self.sent = 0  # requests sent by this process
        self.reused = 0  # requests answered from stored replies

    # ------------------------------------------------------------------ the cache

    def remember(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Seed the cache with the replies stored in records (this model's only)."""
        for record in records:
            for score in record.get("scores") or []:
                for entry in score.get("judge") or []:
                    if entry.get("model") == self.model:
                        key = (entry["prompt_sha256"], int(entry.get("sample", 0)))
                        self._replies[key] = JudgeReply(entry.get("reply", ""), entry.get("error"))

    def reply(self, request: JudgeRequest, item: str) -> JudgeReply:
        """The stored reply to ``request``; an EvalError naming ``item`` when there is none."""
        found = self._replies.get(request.key)
        if found is None:
            raise EvalError(
                f"{item}: no stored reply from judge '{self.model}'; pass --judge-url to ask it"
            )
        return found

    def entry(self, request: JudgeRequest, reply: JudgeReply) -> dict[str, Any]:
        """What a score stores about one reply."""
        out = {
            "model": self.model,
            "prompt_sha256": request.key[0],
            "sample": request.sample,
            "reply": reply.text,
        }
        if reply.error is not None:
            out["error"] = reply.error
        return out

    # ------------------------------------------------------------------ the endpoint

    def ask(self, requests: Sequence[JudgeRequest]) -> None:
        """Fill the cache for every request without a stored reply, ``concurrency`` at a time.
        Raises EvalError (one line) when the endpoint refuses or cannot be reached."""
        todo: dict[tuple[str, int], JudgeRequest] = {}
        for r in requests:
            if r.key in self._replies:
                self.reused += 1
            else:
                todo.setdefault(r.key, r)
        if not todo:
            return
        if self.url is None:
            return  # offline: reply() names the first missing one
        client = self._ensure_client()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
            futures = [pool.submit(self._send, client, r) for r in todo.values()]
            error: EvalError | None = None
            for f in futures:
                if f.cancelled():
                    continue
                try:
                    f.result()
                except EvalError as e:
                    if error is None:  # the first failure stops what has not started
                        error = e
                        for other in futures:
                            other.cancel()
            if error is not None:
                raise error

    def _ensure_client(self) -> Any:
        if self._client is None:
            try:
                import openai
            except ImportError:
                raise EvalError(
                    "--judge-url needs the openai package: pip install 'opsd-mm[judge]'"
                ) from None
            key = os.environ[self.key_env] if self.key_env else "none"
            self._client = openai.OpenAI(
                base_url=self.url, api_key=key, timeout=self.timeout, max_retries=self.retries
            )
        return self._client

    def _send(self, client: Any, request: JudgeRequest) -> None:
        import openai

        where = f"judge endpoint {self.url} (model '{self.model}')"
        max_tokens = min(request.max_tokens, self.max_tokens or request.max_tokens)
        try:
            completion = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": request.prompt}],
                temperature=request.temperature,
                max_completion_tokens=max_tokens,
                n=1,
            )
        except openai.APITimeoutError:
            raise EvalError(
                f"{where} did not answer within {self.timeout:g} s "
                f"({self.retries} retries); check it or raise --judge-timeout"
            ) from None
        except openai.APIConnectionError as e:
            raise EvalError(
                f"{where} is unreachable after {self.retries} retries: "
                f"{_one_line(e.__cause__ or e)}"
            ) from None
        except openai.APIStatusError as e:
            message = _one_line(getattr(e, "message", "") or e)
            if e.status_code in (400, 413) and _TOO_LONG.search(message):
                self._store(request, JudgeReply("", f"HTTP {e.status_code}: {message}"))
                return
            hint = ""
            if e.status_code == 400 and re.search(r"max_(completion_)?tokens", message):
                hint = f" (asked for {max_tokens} tokens; lower --judge-max-tokens)"
            raise EvalError(
                f"{where} refused the request: HTTP {e.status_code}: {message}{hint}"
            ) from None
        choices = getattr(completion, "choices", None) or []
        text = (choices[0].message.content or "") if choices else ""
        self._store(request, JudgeReply(text))

    def _store(self, request: JudgeRequest, reply: JudgeReply) -> None:
        with self._lock:
            self._replies[request.key] = reply
            self.sent += 1


def stored_judge_models(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The judge models whose replies the records hold, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for score in record.get("scores") or []:
            for entry in score.get("judge") or []:
                seen.setdefault(str(entry.get("model")), None)
    return list(seen)

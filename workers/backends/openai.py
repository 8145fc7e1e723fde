"""The ``openai`` backend: a model served by any OpenAI-compatible HTTP server (vLLM, TGI, Ollama,
another Open-AutoGLM gateway). The worker keeps its queues, priorities, ledger, policies and traces;
the batch it forms is forwarded as concurrent chat-completion calls.

    - name: remote-llama
      model_name: meta-llama/Llama-3.1-8B-Instruct   # sent as `model` unless options.remote_model
      backend: openai
      task_type: [text_generation, classification]
      options: {base_url: "http://vllm:8000/v1", api_key_env: VLLM_API_KEY, timeout_s: 30}

HTTP outcomes become the fleet's codes, so the configured policies apply to them: 429 ->
RATE_LIMITED and 503 -> MODEL_UNAVAILABLE (both keep the server's Retry-After, which the retry
policy waits for, up to its backoff_max_s), other 5xx and timeouts -> ENGINE_TRANSIENT, 400/404/422
-> INVALID_INPUT, 401/403 or an unreachable server -> MODEL_UNAVAILABLE.

Classification, ``options.classification``:
- ``chat`` (any server): asked as a chat completion (the instruction or the request's template,
  answered with one label) and the answer is matched to a label. Chat completions carry no per-label
  probabilities, so the chosen label gets 1.0; an answer that names no label is INTERNAL. This needs
  an instruction-following model (a 135M model rambles instead of answering with a label).
- ``autoglm`` (the server is another Open-AutoGLM gateway): its own ``/v1/tasks`` API, which scores
  every label in one forward pass and returns real probabilities.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import httpx
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from shared.config import ModelConfig, Settings
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyOutput, GenerateOutput, Usage
from workers.backends.base import Backend
from workers.prompts import NO_SHOTS, describe, join_labels, render_prompt, shots_for
from workers.wire import Answer, Prepared, PreparedClassify, PreparedGenerate

log = logging.getLogger(__name__)
CLASSIFY_SYSTEM = "Answer with exactly one of the categories you are given, and nothing else."


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: AnyHttpUrl = Field(description="The server's API root, e.g. http://host:8000/v1.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the bearer token.")
    remote_model: str | None = Field(default=None, description="`model` sent to the server (default: model_name).")
    timeout_s: float = Field(default=60.0, gt=0, description="Per call; a call that takes longer is ENGINE_TRANSIENT.")
    max_concurrency: int = Field(default=32, ge=1, le=1024, description="Calls in flight per worker.")
    classify_max_tokens: int = Field(default=8, ge=1, le=64)
    classification: Literal["chat", "autoglm"] = Field(
        default="chat", description="chat: any server, answer matched to a label; autoglm: an Open-AutoGLM "
        "gateway's /v1/tasks (real label probabilities)."
    )


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the policy's own backoff applies


def http_error(response: httpx.Response, url: str) -> FleetError:
    """The fleet's code for a failed call, with what the server said."""
    status = response.status_code
    try:
        detail = response.json()
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = response.text[:300]
    said = f"{url} answered {status}: {detail}"
    if status == 429:
        error = FleetError(ErrorCode.RATE_LIMITED, f"remote rate limit: {said}")
    elif status == 503:
        error = FleetError(ErrorCode.MODEL_UNAVAILABLE, f"remote model unavailable: {said}")
    elif status in (401, 403):
        error = FleetError(ErrorCode.MODEL_UNAVAILABLE, f"remote refused this worker's credentials (check options.api_key_env): {said}")
    elif status in (400, 404, 413, 422):
        error = FleetError(ErrorCode.INVALID_INPUT, f"remote refused the request: {said}")
    else:
        error = FleetError(ErrorCode.ENGINE_TRANSIENT, f"remote error: {said}")
    error.retry_after = retry_after(response)  # type: ignore[attr-defined]
    return error


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label the answer names: the whole answer, else the one it starts with, else the one it
    mentions first (longest label on ties, so 'not spam' beats 'spam')."""
    said = re.sub(r"[\s\"'`.*:!]+", " ", answer.lower()).strip()
    lowered = {label.lower(): label for label in labels}
    if said in lowered:
        return lowered[said]
    starts = [label for key, label in lowered.items() if said.startswith(key)]
    if starts:
        return max(starts, key=len)
    found = [(said.find(key), -len(key), label) for key, label in lowered.items() if re.search(rf"\b{re.escape(key)}\b", said)]
    return min(found)[2] if found else None


class OpenAIEngine:
    """The batch side: one HTTP client, calls in flight up to ``max_concurrency``."""

    device = "remote"

    def __init__(self, config: ModelConfig, options: OpenAIOptions) -> None:
        started = time.perf_counter()
        self.config, self.options = config, options
        key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
        if options.api_key_env and not key:
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"model {config.name}: environment variable {options.api_key_env} is not set")
        self.base = str(options.base_url).rstrip("/")
        self.url = self.base + "/chat/completions"
        self.client = httpx.Client(
            timeout=options.timeout_s, headers={"Authorization": f"Bearer {key}"} if key else {},
            limits=httpx.Limits(max_connections=options.max_concurrency, max_keepalive_connections=options.max_concurrency),
        )
        self.pool = ThreadPoolExecutor(options.max_concurrency, thread_name_prefix=f"openai-{config.name}")
        self.load_seconds = time.perf_counter() - started

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def remote_model(self) -> str:
        return self.options.remote_model or self.config.model_name

    def _request(self, method: str, url: str, ok: int = 200, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        timeout = timeout or self.options.timeout_s
        try:
            response = self.client.request(method, url, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise FleetError(ErrorCode.ENGINE_TRANSIENT,
                             f"{url} did not answer within {timeout:g}s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise FleetError(ErrorCode.MODEL_UNAVAILABLE, f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != ok:
            raise http_error(response, url)
        return response.json()

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", self.url, json={"model": self.remote_model, **body})

    def _generate(self, item: PreparedGenerate) -> Answer:
        request = item.request
        reply = self._call({"messages": request.chat_messages(), "max_tokens": request.max_new_tokens,
                            "temperature": request.temperature, "top_p": request.top_p, "stop": request.stop or None})
        choice = reply["choices"][0]
        usage = reply.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Answer(GenerateOutput(text=choice["message"]["content"] or "", finish_reason=finish),
                      Usage(prompt_tokens=usage.get("prompt_tokens", item.prompt_tokens),
                            completion_tokens=usage.get("completion_tokens", 0)))

    def _classify_native(self, item: PreparedClassify) -> Answer:
        """An Open-AutoGLM gateway's own API: submit, then long-poll the task (waits count against timeout_s)."""
        request = item.request
        shots = shots_for(request, self.config) if item.template is None else NO_SHOTS
        extra: dict[str, Any] = {"prompt_template": item.template} if item.template else {}
        if shots.descriptions:
            extra["label_descriptions"] = dict(shots.descriptions)
        if shots.examples:  # a named set is this fleet's config: the remote one gets its examples inline
            extra["examples"] = [{"text": text, "label": label} for text, label in shots.examples]
        body = {"task_type": "classification", "text": request.text, "labels": request.labels, "model": self.remote_model,
                "priority": str(request.priority), **extra}
        task = self._request("POST", self.base + "/tasks", ok=202, json=body)
        deadline = time.monotonic() + self.options.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(ErrorCode.ENGINE_TRANSIENT, f"remote task {task['id']} not done within {self.options.timeout_s:g}s")
            wait = min(left, 30.0)
            state = self._request("GET", f"{self.base}/tasks/{task['id']}", params={"wait": round(wait, 3)}, timeout=wait + 10)
            if state["status"] == "SUCCESS":
                result = state["result"]
                return Answer(ClassifyOutput(**result["output"]), Usage(prompt_tokens=result["usage"]["prompt_tokens"]))
            if state["status"] in ("FAILURE", "CANCELLED"):
                error = state.get("error") or {}
                code = error.get("code") if error.get("code") in ErrorCode.__members__ else ErrorCode.INTERNAL
                raise FleetError(code, f"remote task {task['id']} failed: {error.get('message', state['status'])}")

    def _classify(self, item: PreparedClassify) -> Answer:
        if self.options.classification == "autoglm":
            return self._classify_native(item)
        request = item.request
        context = self.config.max_context_tokens
        if item.template is not None:
            user = render_prompt(item.template, request.text, request.labels, context) \
                + f"\nAnswer with one of: {join_labels(request.labels)}."
        else:
            user = render_prompt(self.config.classification_instruction, request.text, request.labels, context)
        shots = shots_for(request, self.config) if item.template is None else NO_SHOTS
        messages = [{"role": "system", "content": CLASSIFY_SYSTEM + ("\n\n" + describe(shots.descriptions, {}).strip()
                                                                      if shots.descriptions else "")}]
        for text, label in shots.examples:  # each example as a finished exchange, then the question
            messages += [{"role": "user", "content": render_prompt(self.config.classification_instruction, text,
                                                                   request.labels, context)},
                         {"role": "assistant", "content": label}]
        messages.append({"role": "user", "content": user})
        reply = self._call({"messages": messages, "max_tokens": self.options.classify_max_tokens, "temperature": 0.0})
        said = reply["choices"][0]["message"]["content"] or ""
        label = match_label(said, request.labels)
        if label is None:
            raise FleetError(ErrorCode.INTERNAL, f"remote model answered {said[:80]!r}, which names none of {request.labels}")
        usage = reply.get("usage") or {}
        return Answer(ClassifyOutput(label=label, scores={x: float(x == label) for x in request.labels}),
                      Usage(prompt_tokens=usage.get("prompt_tokens", item.prompt_tokens), completion_tokens=0))

    def _one(self, item: Prepared) -> Answer | FleetError:
        try:
            return self._generate(item) if isinstance(item, PreparedGenerate) else self._classify(item)
        except FleetError as exc:
            return exc

    def run(self, items: list[Prepared]) -> list[Answer | FleetError]:
        """All calls at once; a call that fails comes back as its error, in its place, so its
        batch-mates keep their answers and only it is retried (workers/core/batcher.py)."""
        return list(self.pool.map(self._one, items))


class OpenAIBackend(Backend):
    Options: ClassVar[type[BaseModel]] = OpenAIOptions

    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> Any:
        from workers.prompts import LengthPreparer

        cls.options(config)  # a bad options block fails the worker at start, naming the field
        return LengthPreparer(config)

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> Any:
        return OpenAIEngine(config, cls.options(config))

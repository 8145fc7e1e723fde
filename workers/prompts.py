"""Prompts and limits every backend's request side shares (transformers, openai, echo): how a
classification prompt is rendered, what a too-costly request is told. Torch-free: it runs in the
consumer processes."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from shared import templates
from shared.config import ModelConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest, LabelledExample
from workers.wire import Prepared, PreparedClassify, PreparedGenerate

# A model without a chat template classifies with this plain prompt when no template is given.
PLAIN_TEMPLATE = 'Text: "{text}"\nCategory ({labels}):'
# Texts that say nothing: the model's label preference after them is its bias, not evidence.
CONTENT_FREE_TEXTS = ("N/A", " ", "[MASK]")
# Ordinary sentences about nothing any label set is about: the bias a small model shows on real
# sentences is not the one it shows on "N/A" (on emotions it answered joy 4 times in 48 and fear
# never after content-free calibration). Written for this purpose, in no evaluation family.
NEUTRAL_TEXTS = (
    "The meeting is scheduled for three o'clock on Tuesday.", "The report has twelve pages and two appendices.",
    "Please find the attached document.", "The train leaves from platform four.",
    "This sentence describes an ordinary afternoon.", "The box contains several items of different sizes.",
    "He walked to the corner and turned left.", "The form asks for a name, a date and a signature.",
)
CALIBRATION_TEXTS = {"neutral": NEUTRAL_TEXTS, "content_free": CONTENT_FREE_TEXTS}
# A rendered prompt longer than context x this many characters cannot fit the context window
# (tokenizers average 3-5 characters per token): refuse it before tokenizing it.
MAX_CHARS_PER_TOKEN = 16
# A generation prompt longer than its token budget x this many characters is first counted on that
# prefix only: over budget there, it is refused without tokenizing the rest.
PREFIX_CHARS_PER_TOKEN = 8
# Where no tokenizer is at hand (echo, a remote server), a token is counted as this many characters.
CHARS_PER_TOKEN = 4


def release_memory() -> None:
    """Give freed heap back to the OS after a huge request (glibc keeps it otherwise, and a consumer
    grew 416 -> 1,079 MB over eight 2 MB requests). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def join_labels(labels: list[str]) -> str:
    """'a or b', 'a, b or c': how the classification template lists the choices."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def capitalized(label: str) -> str:
    """A label as the first word of an answer: 'not spam' -> 'Not spam'; 'iPhone' and 'USA' stay."""
    return label if label[1:2].isupper() else label[:1].upper() + label[1:]


@dataclass(frozen=True)
class Shots:
    """What a classification gives the model besides its text: label descriptions (in the prompt; the
    transformers engine caches each label prior per prompt, descriptions included, so this is hashable)
    and labelled examples (its prototype expert; a remote chat model gets them as earlier turns)."""

    examples: tuple[tuple[str, str], ...] = ()  # (text, label), in the order they are shown
    descriptions: tuple[tuple[str, str], ...] = ()  # (label, description), in label order

    def __bool__(self) -> bool:
        return bool(self.examples or self.descriptions)


NO_SHOTS = Shots()


def shots_for(request: ClassifyRequest, config: ModelConfig) -> Shots:
    """The request's descriptions and examples (inline, or the model's named ``example_set``);
    INVALID_INPUT naming the field for a set the model lacks or one labelled outside the request's
    labels. Examples are interleaved label by label (a1 b1 c1 a2 b2 ...): shown as chat turns, a run
    of one label last would tilt the answer towards it."""
    # In the engine core a request arrives rebuilt without validation (workers/wire.py): its
    # examples are plain dicts there.
    examples = [e if isinstance(e, LabelledExample) else LabelledExample(**e) for e in request.examples or []]
    if request.example_set is not None:
        found = config.classification_examples.get(request.example_set)
        if found is None:
            raise FleetError(ErrorCode.INVALID_INPUT, f"example_set: {request.example_set!r} is not defined for model "
                             f"{config.name}; defined: {sorted(config.classification_examples)}")
        foreign = sorted({e.label for e in found} - set(request.labels))
        if foreign:
            raise FleetError(ErrorCode.INVALID_INPUT, f"example_set: {request.example_set!r} has examples labelled "
                             f"{foreign}, which are not among this request's labels {request.labels}")
        examples = list(found)
    queues = {label: [e.text for e in examples if e.label == label] for label in request.labels}
    ordered = [(queue[i], label) for i in range(max(map(len, queues.values()), default=0))
               for label, queue in queues.items() if i < len(queue)]
    return Shots(tuple(ordered), descriptions_of(request))


def descriptions_of(request: ClassifyRequest) -> tuple[tuple[str, str], ...]:
    """(label, description) for the labels that have one, in label order."""
    given = request.label_descriptions or {}
    return tuple((label, given[label]) for label in request.labels if label in given)


def describe(descriptions: tuple[tuple[str, str], ...], shown: dict[str, str]) -> str:
    """The label descriptions as lines a prompt starts with ('' when there are none); ``shown``: how
    each label is written in that prompt."""
    if not descriptions:
        return ""
    return "Categories:\n" + "\n".join(f"- {shown.get(label, label)}: {text}" for label, text in descriptions) + "\n\n"


def render_prompt(template: str, text: str, labels: list[str], context: int) -> str:
    """The classification prompt, never via str.format (a caller's format spec could ask for
    gigabytes; shared/templates.py): INVALID_INPUT for a bad template, PROMPT_TOO_LONG when it
    could not fit a ``context``-token window."""
    try:
        return templates.render(template, text, join_labels(labels), max_chars=context * MAX_CHARS_PER_TOKEN)
    except templates.TemplateError as exc:
        code = ErrorCode.PROMPT_TOO_LONG if isinstance(exc, templates.RenderedTooLong) else ErrorCode.INVALID_INPUT
        raise FleetError(code, f"prompt_template {exc}") from None


def too_costly(prepared: Prepared, limit: int) -> str:
    """PROMPT_TOO_LONG's message for a request that costs more than ``limit`` padded tokens: what it
    costs, why, and what to change."""
    rows = getattr(prepared, "rows", 1)
    message = (f"this request costs {prepared.cost_tokens:,} padded tokens to run ({rows} rows x "
               f"{prepared.cost_tokens // max(rows, 1):,} tokens), over this worker's limit of {limit:,} "
               "(batching.max_request_tokens)")
    if isinstance(prepared, PreparedClassify) and prepared.template is None:
        message += ("; without a prompt_template a classification scores a row per label and per multi-token "
                    "label, each as long as the text: use fewer or shorter labels, a shorter text, or a prompt_template")
    return message


class LengthPreparer:
    """The request side of a model without a local tokenizer (echo, a remote server): validates and
    renders as the real engine does, and counts tokens by length (~4 characters each) for the
    batcher's token budget and the context check."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.context = config.max_context_tokens

    @property
    def name(self) -> str:
        return self.config.name

    def prepare(self, request: GenerateRequest | ClassifyRequest) -> Prepared:
        if isinstance(request, GenerateRequest):
            text = "\n".join(m["content"] for m in request.chat_messages())
            ids = [0] * max(1, len(text) // CHARS_PER_TOKEN)
            if len(ids) + request.max_new_tokens > self.context:
                raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"prompt is {len(ids)} tokens; context {self.context}")
            return PreparedGenerate(request, ids)
        template = request.prompt_template or self.config.classification_template
        shots = shots_for(request, self.config)  # an unknown example_set is refused here too
        instruction = template or self.config.classification_instruction
        prompt = describe(shots.descriptions, {}) + "".join(
            render_prompt(instruction, text, request.labels, self.context) + label for text, label in shots.examples)
        prompt += render_prompt(instruction, request.text, request.labels, self.context)
        tokens = max(1, len(prompt) // CHARS_PER_TOKEN)
        if shots.examples and tokens > self.context:
            raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"{'examples' if request.examples else 'example_set'}: the prompt "
                             f"with {len(shots.examples)} examples is ~{tokens} tokens; model {self.name} takes {self.context}")
        return PreparedClassify(request, template, [0] * tokens, [[1] for _ in request.labels])

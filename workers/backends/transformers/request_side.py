"""The transformers backend's request side: tokenizer, context window, templates.

It runs where requests are taken in (a consumer process, in the task's thread), so the engine core
only collates tensors. It needs the model folder's tokenizer and config, never its weights.
"""

from __future__ import annotations

from pathlib import Path

from shared.config import ModelConfig
from shared.errors import ErrorCode, FleetError
from shared.schemas import ClassifyRequest, GenerateRequest
from workers.artifacts import encoder_folder
from workers.backends.transformers.tokenizer_loading import load_tokenizer, max_positions
from workers.prompts import (
    NO_SHOTS,
    PLAIN_TEMPLATE,
    PREFIX_CHARS_PER_TOKEN,
    Shots,
    capitalized,
    describe,
    release_memory,
    render_prompt,
    shots_for,
)
from workers.wire import Channel, Encoded, Examples, Plain, Prepared, PreparedClassify, PreparedGenerate

# A request's examples are embedded in the core (once per example set, then cached): their tokens in
# all are bounded so one request cannot hold the model for long (a named set is under the same bound).
EXAMPLE_TOKENS = 8_192


class Preparer:
    """The request side of a model: tokenizer, context window, templates. Runs where requests are
    taken in (a consumer process, in the task's thread), so the engine core only collates tensors.
    Needs the model folder's tokenizer and config, never its weights."""

    def __init__(self, config: ModelConfig, path: Path) -> None:
        self.config = config
        remote = config.trust_remote_code
        # Built without importing torch where the class AutoTokenizer chose is on record (tokenizer_loading.py).
        self.tokenizer = load_tokenizer(path, trust_remote_code=remote)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        positions = max_positions(path, trust_remote_code=remote) or 1 << 30
        self.context = min(config.max_context_tokens, positions)
        encoder = config.classification_encoder
        # The encoder's own tokenizer (a few MB, no weights): its experts' ids are made here too.
        self.encoder_tokenizer = None if encoder is None else load_tokenizer(encoder_folder(encoder.source), path)

    @property
    def name(self) -> str:
        return self.config.name

    # -- per request, in the task's thread -----------------------------------------------------
    def prepare(self, request: GenerateRequest | ClassifyRequest) -> Prepared:
        """Tokenise and check limits; raises FleetError(PROMPT_TOO_LONG / INVALID_INPUT)."""
        if isinstance(request, GenerateRequest):
            return self._prepare_generate(request)
        return self._prepare_classify(request)

    def _surely_too_long(self, request: GenerateRequest) -> None:
        """PROMPT_TOO_LONG without tokenizing the whole prompt when a prefix alone is over the budget.

        A 2 MB chat request cost ~3 s of a consumer's CPU to tokenize before it was refused, and the
        tokenizer's buffers grew the process by hundreds of MB. The prefix's token count is a lower
        bound of the whole's (less one: the cut may split a token)."""
        budget = self.context - request.max_new_tokens
        window = max(1, budget) * PREFIX_CHARS_PER_TOKEN
        texts = [m["content"] for m in request.chat_messages()]
        if sum(len(t) for t in texts) <= window:
            return
        at_least = len(self.tokenizer("\n".join(texts)[:window], add_special_tokens=False)["input_ids"]) - 1
        if at_least > budget:
            release_memory()
            raise FleetError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt is over {at_least} tokens (counted on its first {window:,} characters) + max_new_tokens "
                f"{request.max_new_tokens} > context {self.context} of model {self.name}; shorten the prompt",
            )

    def _prepare_generate(self, request: GenerateRequest) -> PreparedGenerate:
        self._surely_too_long(request)
        if request.chat_template and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                request.chat_messages(), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif request.prompt is not None:
            ids = self.tokenizer(request.prompt)["input_ids"]
        else:
            raise FleetError(ErrorCode.INVALID_INPUT, f"model {self.name} has no chat template; send 'prompt'")
        if len(ids) + request.max_new_tokens > self.context:
            release_memory()
            raise FleetError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt is {len(ids)} tokens + max_new_tokens {request.max_new_tokens} > context "
                f"{self.context} of model {self.name}; shorten the prompt or lower max_new_tokens",
            )
        return PreparedGenerate(request, ids)

    def classify_ids(self, text: str, labels: list[str], template: str | None, shots: Shots = NO_SHOTS) -> list[int]:
        """The prompt's token ids. With a template: the rendered text, labels to follow after a
        space. Without (the default): the chat method - the instruction, text and label list as the
        user's turn of the model's own chat template, the label to follow as the assistant's answer.
        An instruct model answers its chat format for any label set; a plain template must be
        worded per task (docs/quantization.md, "Classification method"). ``shots``' label
        descriptions open the prompt (its examples go to the prototype expert, ``examples``)."""
        if template is not None:
            described = describe(shots.descriptions, {})
            return self.tokenizer(described + render_prompt(template, text, labels, self.context))["input_ids"]
        shown = dict(zip(labels, self.chat_labels(labels), strict=True))
        user = render_prompt(self.config.classification_instruction, text, list(shown.values()), self.context)
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": describe(shots.descriptions, shown) + user}], tokenize=False,
            add_generation_prompt=True)
        return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

    def examples(self, text: str, labels: list[str], shots: Shots) -> Examples | None:
        """The prototype expert's tokens: the text and each example as plain text (no prompt)."""
        if not shots.examples:
            return None
        encode = self.tokenizer([text] + [shown for shown, _ in shots.examples], add_special_tokens=False)["input_ids"]
        return Examples(encode[0], encode[1:], [labels.index(label) for _, label in shots.examples])

    def encoded(self, text: str, labels: list[str], template: str | None, shots: Shots) -> Encoded | None:
        """The encoder experts' ids (``classification_encoder``): the text, each label's phrase (the
        default method only: a caller's template asks for the LM's reading alone) and the examples,
        each cut to the encoder's ``max_tokens``."""
        encoder = self.config.classification_encoder
        if encoder is None or self.encoder_tokenizer is None or (template is not None and not shots.examples):
            return None
        described = dict(shots.descriptions)
        phrases = [] if template is not None else [
            encoder.phrase.format(label=label) + (f" {described[label]}" if label in described else "") for label in labels]
        texts = [text, *phrases, *(shown for shown, _ in shots.examples)]
        ids = self.encoder_tokenizer(texts, truncation=True, max_length=encoder.max_tokens)["input_ids"]
        return Encoded(ids[0], ids[1 : 1 + len(phrases)], ids[1 + len(phrases) :],
                       [labels.index(label) for _, label in shots.examples])

    def channel(self, text: str, labels: list[str]) -> Channel | None:
        """The text's tokens and each label's channel prefix (``classification_channel``), or None
        when the model's config turns the channel off."""
        prefix = self.config.classification_channel
        if prefix is None:
            return None
        before, after = prefix.split("{label}")
        ids = [self.tokenizer(before + label + after, add_special_tokens=False)["input_ids"] for label in labels]
        return Channel(self.tokenizer(text, add_special_tokens=False)["input_ids"], ids)

    def chat_labels(self, labels: list[str]) -> list[str]:
        """The labels as the chat method shows and scores them (``classification_capitalize``)."""
        return [capitalized(label) for label in labels] if self.config.classification_capitalize else labels

    def label_ids(self, labels: list[str], template: str | None) -> list[list[int]]:
        """Each label's tokens as they would follow the prompt: after a space in running text, at
        the start of the assistant's turn in the chat method."""
        labels, prefix = (self.chat_labels(labels), "") if template is None else (labels, " ")
        return [self.tokenizer(prefix + label, add_special_tokens=False)["input_ids"] for label in labels]

    def _prepare_classify(self, request: ClassifyRequest) -> PreparedClassify:
        template = request.prompt_template or self.config.classification_template
        if template is None and not self.tokenizer.chat_template:
            template = PLAIN_TEMPLATE
        shots = shots_for(request, self.config)
        prompt_ids = self.classify_ids(request.text, request.labels, template, Shots(descriptions=shots.descriptions))
        label_ids = self.label_ids(request.labels, template)
        channel = self.channel(request.text, request.labels) if template is None else None
        plain = None
        if template is None and self.config.classification_plain is not None:
            plain_template = self.config.classification_plain
            plain = Plain(plain_template, self.classify_ids(request.text, request.labels, plain_template,
                                                            Shots(descriptions=shots.descriptions)),
                          self.label_ids(request.labels, plain_template))
        examples = self.examples(request.text, request.labels, shots)
        if examples is not None:
            field = "examples" if request.examples else "example_set"
            for index, ids in enumerate(examples.example_ids):
                if len(ids) > self.context:
                    raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"{field}[{index}].text: {len(ids)} tokens; model "
                                     f"{self.name} takes {self.context}")
            total = sum(map(len, examples.example_ids))
            if total > EXAMPLE_TOKENS:
                raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"{field}: {len(examples.example_ids)} examples of {total:,} "
                                 f"tokens in all, over {EXAMPLE_TOKENS:,}: send fewer or shorter examples")
        longest = len(prompt_ids) + max(len(ids) for ids in label_ids)
        if longest > self.context:
            release_memory()
            raise FleetError(
                ErrorCode.PROMPT_TOO_LONG,
                f"text is {len(prompt_ids)} tokens with the template; model {self.name} takes {self.context}",
            )
        if channel is not None and len(channel.text_ids) + max(map(len, channel.prefix_ids)) > self.context:
            raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"text is {len(channel.text_ids)} tokens; model {self.name} takes {self.context}")
        if plain is not None and len(plain.prompt_ids) + max(map(len, plain.label_ids)) > self.context:
            raise FleetError(ErrorCode.PROMPT_TOO_LONG, f"text is {len(plain.prompt_ids)} tokens with the plain prompt; "
                             f"model {self.name} takes {self.context}")
        encoded = self.encoded(request.text, request.labels, template, shots)
        return PreparedClassify(request, template, prompt_ids, label_ids, channel, plain, examples, encoded)


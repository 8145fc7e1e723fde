"""The backend interface: LitServe's LitAPI hooks, split over the fleet's two processes.

    consumer process   decode_request   request_side(...).prepare(request) -> Prepared
                                         validate, tokenize, check limits; in the task's thread,
                                         never touching the model
    engine core        setup            batch_side(...)  (load once, before the first request)
                       batch + predict  batch_side(...).run(items) -> list[Answer], one answer per
                       + unbatch        item, for a batch of one model and one task type
    (the fleet)        encode_response  an Answer becomes the stored TaskResult

Why split: the engine core runs the model loop alone in its process (docs/architecture.md), so
everything per request happens before a request reaches it. A backend raises FleetError with a
code for anything that fails; the batch policies (config ``policies``) decide retry, split or fail.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.config import ModelConfig, Settings
from shared.errors import invalid_input
from shared.schemas import TaskRequestBase
from workers.wire import Answer, Prepared


class RequestSide(Protocol):
    config: ModelConfig

    @property
    def name(self) -> str: ...

    def prepare(self, request: TaskRequestBase) -> Prepared: ...


class BatchSide(Protocol):
    device: Any
    load_seconds: float

    @property
    def name(self) -> str: ...

    def run(self, items: list[Prepared]) -> list[Answer]: ...


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend:
    """Subclass and register under the ``autoglm.backends`` entry point group."""

    #: the backend's own YAML options (a model entry's ``options:``), validated when it is used
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: whether `autoglm models prepare` builds an artifact for it (download, convert, quantize)
    prepares_artifact: ClassVar[bool] = False

    @classmethod
    def options(cls, config: ModelConfig) -> Any:
        """The model's ``options``, validated: INVALID_INPUT naming the bad fields."""
        try:
            return cls.Options.model_validate(config.options)
        except ValidationError as exc:
            raise invalid_input(exc) from None

    @classmethod
    def request_side(cls, settings: Settings, config: ModelConfig) -> RequestSide:
        raise NotImplementedError

    @classmethod
    def batch_side(cls, settings: Settings, config: ModelConfig) -> BatchSide:
        raise NotImplementedError

    @classmethod
    def prepare(cls, settings: Settings, config: ModelConfig, report: Any = print, force: bool = False) -> dict[str, Any]:
        """Build what workers load (only when ``prepares_artifact``); returns its manifest."""
        return {}

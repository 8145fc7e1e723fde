"""The worker side of a task type: ``prepare`` (consumer process: a request -> what the engine core
batches) and ``run`` (engine core: a batch -> one Answer, or an exception, per item).

Both get the model's backend sides (workers/backends): ``prepare`` its request side (for the
transformers backend: ``.tokenizer``, ``.context``, ``.config``), ``run`` its batch side (``.model``,
``.tokenizer``, ``.device``). A plugin's handler returns ``PreparedTask`` (its own msgpack-able
payload plus its batching cost: rows x width tokens); the built-in two delegate to the backends,
which know them natively.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol

from shared import task_types
from workers.wire import Answer, Prepared


class Handler(Protocol):
    def prepare(self, request_side: Any, request: Any) -> Prepared: ...

    def run(self, batch_side: Any, items: list[Any]) -> list[Answer | BaseException]: ...


class Generation:
    def prepare(self, request_side: Any, request: Any) -> Prepared:
        return request_side.prepare(request)

    def run(self, batch_side: Any, items: list[Any]) -> list[Any]:
        return batch_side.run(items)


Classification = Generation  # the backends dispatch on the prepared item's kind themselves


@functools.cache
def handler(name: str) -> Handler:
    module, _, attr = task_types.get(name).handler.partition(":")
    return getattr(importlib.import_module(module), attr)()

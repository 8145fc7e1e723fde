"""The engine runs one forward pass at a time: any thread that calls the model waits for the one
using it (when continuous batching ran in a thread of its own, interleaved forward passes made later
classifications come out wrong; it now steps in the engine core's loop, and the lock still guards
the model against any other caller)."""

from __future__ import annotations

import threading
import time

import torch

from tests.unit.test_engine import engine  # noqa: F401 - the module-scoped tiny engine
from workers.backends.transformers.batch_side import Engine


def test_a_forward_pass_holds_the_model_lock_and_waits_for_it(engine: Engine) -> None:  # noqa: F811
    held: list[bool] = []
    probe = engine.model.register_forward_hook(
        lambda *_: held.append(engine.model_lock._is_owned()), prepend=True)  # type: ignore[attr-defined]
    try:
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        probe.remove()
    assert held == [True] and not engine.model_lock._is_owned()  # type: ignore[attr-defined]

    done = threading.Event()

    def forward() -> None:
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([[1, 2]]))
        done.set()

    with engine.model_lock:  # as if the other thread's forward pass were running
        worker = threading.Thread(target=forward)
        worker.start()
        time.sleep(0.2)
        assert not done.is_set(), "a second forward pass ran while the first held the model"
    worker.join(10)
    assert done.is_set()

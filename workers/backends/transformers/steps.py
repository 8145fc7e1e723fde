"""transformers' ContinuousBatchingManager, stepped by the engine core's loop (workers/core/continuous.py)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from shared.config import ContinuousConfig


def continuous_batches(engine: Any, config: ContinuousConfig) -> tuple[Any, ManagerSteps]:
    """The model's manager (greedy: it samples or not for all its rows) and its stepper."""
    generation = GenerationConfig(do_sample=False, max_new_tokens=engine.context, eos_token_id=engine.stop_token_ids,
                                  pad_token_id=engine.tokenizer.pad_token_id)
    manager = engine.model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=ContinuousBatchingConfig(**config.manager_options()))
    return manager, ManagerSteps(manager)


class ManagerSteps:
    """The manager's generation loop, one step per call, in the calling thread.

    Why not the manager's own thread (``manager.start()``): a second thread running torch has an
    OpenMP pool of its own, and once libgomp manages more pool threads than CPUs it throttles every
    pool's spin-wait to at most 1,000 turns; each short parallel region of a CPU forward pass then
    waits for sleeping threads. With the thread running (idle, even) the engine core's
    classification batches took 411-555 ms against 331-414 ms in-process (2-core AMD EPYC,
    bench/RESULTS.md "2026-12-02, evening"). One thread also means one forward pass at a time
    without a lock handoff, as in vLLM V1's engine-core busy loop.

    The body is transformers' ``_generation_loop_body`` (5.24, pinned in pyproject.toml) minus its
    0.1 s wait for requests: the engine core's loop decides when to step. In async mode (CUDA
    graphs) the first step is not followed by an update, as in the manager's own bootstrap.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.processor = manager._create_batch_processor()
        manager.batch_processor = self.processor  # where the manager's own methods look for it
        manager.current_batch = 0
        self._bootstrapped = not self.processor.use_async_batching
        self.failed: Exception | None = None

    def run(self) -> None:
        """One step; an exception is kept in ``failed`` (the caller sends later rows elsewhere) and raised."""
        try:
            with torch.inference_mode():
                if not self.processor.prepare_next_batch():
                    return  # nothing to schedule (every row finished or was cancelled)
                self.manager._generation_step()
                self.manager.current_batch += 1
                if self._bootstrapped:
                    self.processor.update_batch()
                self._bootstrapped = True
        except Exception as exc:
            self.failed = exc
            raise

    def close(self) -> None:
        """What the manager's ``stop()`` undoes after its thread (which never ran here): the model's
        own attention implementation back, the paged cache released."""
        if self.manager._original_attn_impl is not None:
            self.manager.model.set_attn_implementation(self.manager._original_attn_impl)
            self.manager._original_attn_impl = None
        self.manager.batch_processor = self.processor = None

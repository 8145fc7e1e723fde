"""TEST ONLY fault injection: make batches fail on purpose to prove retry, split and isolation.

Off unless ``faults`` is set in the config (e.g. ``AUTOGLM_FAULTS='{"oom_batch_over": 2}'``):
- ``oom_batch_over: N``       RESOURCE_EXHAUSTED for any batch of more than N requests;
- ``transient_marker: S``     ENGINE_TRANSIENT, every time, for a batch holding a request whose
  text contains S (a poison request);
- ``flaky_marker: S``         ENGINE_TRANSIENT for such a batch the first ``flaky_times`` times;
- ``fail_marker: S``          a permanent INTERNAL error for a batch holding such a request;
- ``slow_ms: N``              sleep N ms in every batch (so a test can kill a worker mid-batch).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from shared.errors import ErrorCode, FleetError


def _text(payload: Any) -> str:
    request = payload.request
    return getattr(request, "text", None) or getattr(request, "prompt", None) or ""


class Faults:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._flaky = itertools.count()

    def __bool__(self) -> bool:
        return bool(self.spec)

    def check(self, payloads: Sequence[Any]) -> None:
        spec = self.spec
        if spec.get("slow_ms"):
            time.sleep(spec["slow_ms"] / 1000.0)
        texts = [_text(p) for p in payloads]
        if spec.get("oom_batch_over") is not None and len(payloads) > spec["oom_batch_over"]:
            raise FleetError(ErrorCode.RESOURCE_EXHAUSTED, f"injected: out of memory for a batch of {len(payloads)}")
        marker = spec.get("fail_marker")
        if marker and any(marker in t for t in texts):
            raise RuntimeError(f"injected permanent fault ({marker})")
        marker = spec.get("transient_marker")
        if marker and any(marker in t for t in texts):
            raise FleetError(ErrorCode.ENGINE_TRANSIENT, f"injected transient fault ({marker})")
        marker = spec.get("flaky_marker")
        if marker and any(marker in t for t in texts) and next(self._flaky) < spec.get("flaky_times", 1):
            raise FleetError(ErrorCode.ENGINE_TRANSIENT, f"injected one-off transient fault ({marker})")

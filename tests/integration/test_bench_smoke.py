"""`python -m bench --quick --json` runs end to end and reports every headline key.

Times are never asserted (shared CI machines are noisy); bench/RESULTS.md holds measured figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
KEYS = [
    "fleet_vs_limit", "fleet_vs_naive", "interactive_p95_idle_ms", "interactive_p95_under_bulk_ms",
    "enqueue_tasks_per_s", "gptq_weight_bytes_ratio", "accuracy_float", "accuracy_gptq", "device",
    "celery_floor_tasks_per_s", "machinery_tasks_per_s", "machinery_vs_celery_floor", "machinery_cpu_ms_per_task",
    "fast_model_tasks_per_s", "fast_fleet_vs_naive", "engine_core_tasks_per_s", "engine_core_cpu_us_per_task",
    "engine_core_vs_inprocess",
]
# Every scenario but `scaling` (two more worker starts; its figures are not headline keys).
SCENARIOS = "throughput,isolation,enqueue,quantization,celery-floor,machinery,fast-model,engine-core"


def test_quick_bench_reports_every_key(prepared_models: None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", "--only", SCENARIOS], check=False, cwd=REPO, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    missing = [k for k in KEYS if summary.get(k) is None]
    assert not missing, f"missing {missing} in {summary}"
    assert summary["labels_agree_fleet_limit"] >= 0.95  # the fleet answers what the engine answers (fp noise aside)
    # Better than chance on the smoke's 24 balanced sentiment rows (one label for all reads 0.5); the
    # artifact's quality gate is test_quality's, on the selection split, never the reported one.
    assert summary["accuracy_gptq"] > 0.5
    assert set(summary["fast_model_tasks_per_s"]) == {"limit", "naive", "fleet"}
    assert summary["engine_core_labels_agree"] >= 0.95  # fed over its socket, the core answers what the engine answers

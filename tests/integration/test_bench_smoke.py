"""`python -m bench --smoke --json` runs end to end and reports every headline key.

Plumbing at the smallest sizes (`--smoke`): the speed scenarios run on the tiny random-weight model
with the real tokenizer (`--shape tiny`); the quantization scenario, which measures the real model's quality, runs
under `make test-all` (marker ``slow``). Times are never asserted (shared CI machines are noisy):
the targets are the benchmark's, and bench/RESULTS.md holds measured figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.beside]  # its own bench processes, not the shared fleets
REPO = Path(__file__).resolve().parents[2]
KEYS = [
    "fleet_vs_limit", "fleet_vs_naive", "interactive_p95_idle_ms", "interactive_p95_under_bulk_ms",
    "enqueue_tasks_per_s", "device",
    "celery_floor_tasks_per_s", "machinery_tasks_per_s", "machinery_vs_celery_floor", "machinery_cpu_ms_per_task",
    "engine_core_tasks_per_s", "engine_core_cpu_us_per_task", "engine_core_vs_inprocess",
]
# Every speed scenario but `scaling` (two more worker starts; its figures are not headline keys) and
# `fast-model`, which under --shape tiny is `throughput`'s classification run again on the same model.
SCENARIOS = "throughput,isolation,enqueue,celery-floor,machinery,engine-core"


def _bench(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench", "--json", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quick_bench_reports_every_key(prepared_models: None) -> None:
    summary = _bench("--smoke", "--shape", "tiny", "--only", SCENARIOS)
    missing = [k for k in KEYS if summary.get(k) is None]
    assert not missing, f"missing {missing} in {summary}"
    assert summary["labels_agree_fleet_limit"] >= 0.95  # the fleet answers what the engine answers (fp noise aside)
    assert set(summary["classify_tasks_per_s"]) == {"limit", "naive", "fleet"}
    assert summary["bulk_done_while_measuring"] < summary["bulk_backlog"]  # the probes ran under a backlog
    assert summary["engine_core_labels_agree"] >= 0.95  # fed over its socket, the core answers what the engine answers


@pytest.mark.slow
def test_quick_quantization_scenario_reports_the_real_models_accuracy(prepared_models: None) -> None:
    summary = _bench("--quick", "--only", "quantization")
    assert summary["gptq_weight_bytes_ratio"] < 1.0 and summary["accuracy_float"] is not None
    # Better than chance on the smoke's 24 balanced sentiment rows (one label for all reads 0.5); the
    # artifact's quality gate is test_quality's, on the selection split, never the reported one.
    assert summary["accuracy_gptq"] > 0.5

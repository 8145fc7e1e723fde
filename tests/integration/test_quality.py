"""What the shipped artifact was measured to keep, read from the manifest `prepare` wrote.

`prepare` (run once per machine by `make test` / `make demo`) measured the float model and each GPTQ
attempt on the *selection* split of every task family and shipped an attempt only within the
relative gates; these tests hold it to that record. The report-split figures live in
bench/RESULTS.md (`python -m bench --only quantization`).
"""

from __future__ import annotations

import pytest

from shared.config import Settings
from workers.artifacts import read_manifest, served_dir
from workers.prepare.evaluation import FAMILY_LABELS, families
from workers.prepare.quantize import _losses

pytestmark = pytest.mark.integration


def test_every_family_has_both_splits_and_enough_rows() -> None:
    for family in families():
        assert len(family.rows) >= 100, family.name
        assert {label for _, label, _ in family.rows} == set(family.labels)
        assert family.examples("selection") and family.examples("report")
        texts = [text for text, _, _ in family.rows]
        assert len(set(texts)) == len(texts), f"{family.name} repeats a text"


def test_the_shipped_artifact_is_within_the_gates_on_the_selection_split(settings: Settings, prepared_models: None) -> None:
    model = settings.models[0]
    manifest = read_manifest(served_dir(settings, model))
    assert manifest is not None
    gates = model.quantize
    assert manifest["loss_vs_float"] <= gates.max_loss_vs_float + 1e-9
    assert manifest["qa_loss_vs_float"] <= gates.max_qa_loss_vs_float + 1e-9
    _, worst_family, _ = _losses(manifest["float"], manifest["served"])  # the gate's own arithmetic
    if gates.max_family_loss_vs_float is not None:  # no family lost more than its limit either
        assert worst_family is not None and worst_family <= gates.max_family_loss_vs_float + 1e-9
    # measured zero-shot and with GATE_EXAMPLES examples per label, family by family
    assert set(manifest["served"]["classification"]) == set(FAMILY_LABELS) | {f"{name}+examples" for name in FAMILY_LABELS} | {"overall"}
    assert manifest["chosen"] == next(a["settings"] for a in manifest["attempts"] if a["passed"])
    assert manifest["machine"]["cpu"] and manifest["machine"]["gptqmodel"]

"""The evaluation data's identity: prepare caches the float model's scores under it."""

from __future__ import annotations

import pytest

from workers.prepare import evaluation
from workers.prepare.evaluation import Family, data_fingerprint, families


def _with_rows(monkeypatch: pytest.MonkeyPatch, change) -> str:  # type: ignore[no-untyped-def]
    """The fingerprint after ``change`` rewrote the first family's rows."""
    first, *rest = families()
    changed = Family(first.name, first.labels, change(list(first.rows)))
    monkeypatch.setattr(evaluation, "families", lambda: (changed, *rest))
    return data_fingerprint()


def test_every_family_has_selection_and_at_least_100_report_rows() -> None:
    for family in families():
        assert family.examples("selection") and len(family.examples("report")) >= 100, family.name


def test_new_report_rows_keep_the_cached_float_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    before = data_fingerprint()
    assert _with_rows(monkeypatch, lambda rows: rows + [("A new held-out row.", rows[0][1], "report")]) == before


def test_a_changed_selection_row_invalidates_them(monkeypatch: pytest.MonkeyPatch) -> None:
    before = data_fingerprint()
    def relabel(rows):  # type: ignore[no-untyped-def]
        text, label, _ = next(r for r in rows if r[2] == "selection")
        other = next(r[1] for r in rows if r[1] != label)
        return [(t, other if t == text else g, s) for t, g, s in rows]
    assert _with_rows(monkeypatch, relabel) != before


def test_the_new_families_keep_each_labels_first_rows_split_in_half_and_never_repeat_a_text() -> None:
    """Each label's first rows are split half and half (SHA-1 order); rows appended after the settings
    were chosen on them (the last of each file) are all report rows, so that a family's report part
    has ~50 rows and one row moves it by ~2 points, not ~4."""
    from workers.prepare.evaluation import new_families

    for family in new_families():
        texts = [text.lower() for text, _, _ in family.rows]
        assert len(texts) == len(set(texts)), family.name
        for label in family.labels:
            parts = [part for _, gold, part in family.rows if gold == label]
            selection = parts.count("selection")
            assert selection >= 5 and parts[: 2 * selection].count("report") == selection, (family.name, label)
        assert len(family.examples("report")) >= 48, family.name

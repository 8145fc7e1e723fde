"""The token-stream format both sides share (shared/streams.py)."""

from __future__ import annotations

from shared.config import load_settings
from shared.schemas import Usage
from shared.streams import Event, Reader, Reassembler, decode


def test_entries_decode_to_text_end_or_error() -> None:
    assert decode({b"o": b"3", b"d": b"lo "}) == Event(offset=3, text="lo ")
    assert decode({"end": "stop"}).finish == "stop"
    assert decode({b"end": b"length", b"prompt_tokens": b"12", b"completion_tokens": b"64"}).usage == Usage(prompt_tokens=12, completion_tokens=64)
    failed = decode({"error": "CANCELLED", "message": "gone"})
    assert (failed.error, failed.message) == ("CANCELLED", "gone")


def test_a_reader_keeps_the_end_entry_with_its_finish_reason_and_usage() -> None:
    reader = Reader("t")
    records = [("autoglm:stream:t", [("1-0", {"o": "0", "d": "Hi"}),
                                     ("2-0", {"end": "stop", "prompt_tokens": "5", "completion_tokens": "2"})])]
    assert reader.feed(records) == ["Hi"] and reader.done
    assert reader.end == Event(finish="stop", usage=Usage(prompt_tokens=5, completion_tokens=2))


def test_a_redelivered_run_never_repeats_text_to_the_reader() -> None:
    """A task redelivered after its engine core died streams again from offset 0: the reader
    passes on only what it has not passed on yet."""
    reader = Reassembler()
    first_run = [Event(0, "Once "), Event(5, "upon ")]
    second_run = [Event(0, "Once "), Event(5, "upon a "), Event(12, "time")]
    out = [reader.new_text(e) for e in first_run + second_run]
    assert "".join(out) == "Once upon a time"
    assert out[2] == "" and out[3] == "a "


def test_a_device_overrides_part_of_the_continuous_section() -> None:
    settings = load_settings(batching={"continuous": {"max_rows": 16, "num_blocks": 32, "interactive_reserve": 3},
                                       "by_device": {"cpu": {"continuous": {"max_rows": 6, "num_blocks": None}}}})
    cpu = settings.on_device("cpu").batching.continuous
    assert (cpu.max_rows, cpu.num_blocks, cpu.interactive_reserve) == (6, None, 3)  # the rest is the general value
    assert settings.batching.continuous.num_blocks == 32

"""A consumer builds its tokenizers without importing torch once AutoTokenizer's choice is on record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from workers.backends.transformers.tokenizer_loading import RECORD, load_tokenizer, max_positions

TEXT = "Héllo wörld, <|im_start|> a  test\twith 東京 and 12345!"
REPO = Path(__file__).resolve().parents[2]


def _fresh_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors", RECORD))
    return copy


def test_the_first_load_goes_through_autotokenizer_and_later_ones_build_its_class_without_torch(
        real_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = _fresh_copy(real_tokenizer_dir, tmp_path)
    first = load_tokenizer(folder)  # nothing on record: AutoTokenizer, whose choice is recorded
    recorded = json.loads((folder / RECORD).read_text())
    assert list(recorded.values()) == [type(first).__name__]
    probe = ("import sys; from pathlib import Path; from workers.backends.transformers.tokenizer_loading import load_tokenizer;"
             f"t = load_tokenizer(Path({str(folder)!r}));"
             f"print(type(t).__name__, 'torch' in sys.modules, t({TEXT!r})['input_ids'], t.chat_template is not None)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    name, torch_loaded, *rest = done.stdout.split(" ", 2)
    assert name == type(first).__name__ and torch_loaded == "False"
    assert rest[0].strip() == f"{first(TEXT)['input_ids']} True"


def test_a_record_is_not_used_for_another_transformers_version_or_other_tokenizer_files(
        real_tokenizer_dir: Path, tmp_path: Path) -> None:
    """The record names a class per (transformers version, folder, tokenizer_config.json): another
    version, or another tokenizer in the same folder, asks AutoTokenizer again; so does remote code.
    The context comes from config.json."""
    folder = _fresh_copy(real_tokenizer_dir, tmp_path)
    load_tokenizer(folder)
    (key,) = json.loads((folder / RECORD).read_text())
    version, where, digest = key.split(":")
    (folder / RECORD).write_text(json.dumps({f"0.0.0:{where}:{digest}": "BertTokenizer",
                                             f"{version}:{where}:another": "BertTokenizer"}))
    assert type(load_tokenizer(folder)).__name__ != "BertTokenizer"
    assert len(json.loads((folder / RECORD).read_text())) == 3  # this version's choice for these files, beside the others
    assert max_positions(folder) == json.loads((folder / "config.json").read_text())["max_position_embeddings"]

"""Tokenizers for the request side, built without importing torch where that is known to be safe.

Why: ``AutoTokenizer`` loads the model's config first to choose a tokenizer class, and transformers'
config module imports torch. A consumer process never runs a model, yet each paid torch's import for
its tokenizers: about 2 s of CPU and a few hundred MB per consumer, at every worker start.

What is safe: the class AutoTokenizer chose for a folder, built directly. That choice is recorded,
the first time a process loads the folder through AutoTokenizer, in a small file inside the model
folder (``RECORD``), keyed by the tokenizer folder, its tokenizer_config.json and transformers'
version; later processes build that class by name. AutoTokenizer's choice is never guessed, only
reused; a folder with remote code, not yet recorded, or whose recorded class no longer loads it goes
through AutoTokenizer as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: The file, inside a model folder, naming the tokenizer class AutoTokenizer chose per tokenizer folder.
RECORD = "autoglm-tokenizers.json"


def load_tokenizer(path: Path, record_in: Path | None = None, trust_remote_code: bool = False) -> Any:
    """``path``'s tokenizer, as ``AutoTokenizer.from_pretrained(path)`` builds it; ``record_in``: the
    model folder that keeps the record (default ``path`` itself; the model's folder for its
    classification encoder's tokenizer, which lives in an installed package)."""
    import transformers

    record_in = path if record_in is None else record_in

    key = f"{transformers.__version__}:{Path(path).resolve()}:{_config_digest(path)}"
    chosen = None if trust_remote_code else _read(record_in).get(key)
    tokenizer_class = getattr(transformers, chosen, None) if chosen else None
    if tokenizer_class is not None:
        with contextlib.suppress(Exception):  # a class that no longer loads this folder: ask AutoTokenizer again
            return tokenizer_class.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    name = type(tokenizer).__name__
    if not trust_remote_code and getattr(transformers, name, None) is type(tokenizer):
        _write(record_in, key, name)
    return tokenizer


def max_positions(path: Path, trust_remote_code: bool = False) -> int | None:
    """The model's ``max_position_embeddings``: read from config.json where it is written there
    (no torch), else through AutoConfig (which maps other names for it, e.g. GPT-2's n_positions)."""
    with contextlib.suppress(OSError, ValueError):
        found = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(found, int):
            return found
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "max_position_embeddings", None)


def _config_digest(path: Path) -> str:
    """Identity of the folder's tokenizer_config.json: a folder whose tokenizer was replaced (a new
    package version at the same path) is not taken for the one on record."""
    try:
        return hashlib.sha256((Path(path) / "tokenizer_config.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return "-"


def _read(folder: Path) -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        found = json.loads((Path(folder) / RECORD).read_text())
        if isinstance(found, dict):
            return found
    return {}


def _write(folder: Path, key: str, name: str) -> None:
    """Add one entry, atomically (consumers of one worker start together); an unwritable folder keeps no record."""
    record = _read(folder)
    if record.get(key) == name:
        return
    record[key] = name
    partial = Path(folder) / f".{RECORD}.{os.getpid()}"
    with contextlib.suppress(OSError):
        partial.write_text(json.dumps(record, indent=1, sort_keys=True))
        partial.replace(Path(folder) / RECORD)

"""Crash-safe file writes: a temporary file in the same folder, then an atomic rename, so a kill
during a write leaves the previous file whole (metrics.json, records, reports)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes `text` to `path` through a temporary file and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def update_json(path: Path, key: str, value: Any) -> dict:
    """Sets `key` of the JSON object in `path` (created if missing), keeping the other keys."""
    data = read_json(path, {})
    data[key] = value
    write_text_atomic(path, json.dumps(data, indent=2))
    return data

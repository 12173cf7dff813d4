"""The drop-or-stop policy for bad rows (empty text, missing or unreadable image) shared by the data
modules: stop listing them, or drop them and list them in a CSV in the run directory (nothing is lost
silently)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from mmtune.errors import DataError

log = logging.getLogger(__name__)


def stop_or_skip(bad: dict[str, str], policy: str, what: str, setting: str, listed_in: str) -> None:
    """Raises for `bad` ({origin: reason}) under `policy: error`, else warns that they are skipped."""
    if not bad:
        return
    if policy == "error":
        shown = "; ".join(f"{origin}: {reason}" for origin, reason in list(bad.items())[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} {what}(s) (set {setting}: skip to drop them): {shown}{more}")
    log.warning("[mmtune] skipping %d %s(s); see %s in the run directory", len(bad), what, listed_in)


def write_skipped(trainer, skipped: dict[str, str] | list[tuple[str, str]], filename: str, key_header: str) -> None:
    """Writes {origin: reason} (or (key, reason) pairs, where a key may repeat) as `filename` in the run
    directory, from rank 0, one line per skipped row. Every rank must call it (`trainer.log_dir` is a
    collective under DDP)."""
    if trainer is None:
        return
    log_dir = trainer.log_dir
    if not skipped or not trainer.is_global_zero or not log_dir:
        return
    out = Path(log_dir) / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key_header, "reason"])
        writer.writerows(sorted(skipped.items() if isinstance(skipped, dict) else skipped))

"""The run report: `report.html` in a run directory, one self-contained page (plots embedded) that a
person reads instead of `metrics.json`.

It reads only the run directory's files (`collect`), never a task, so it can be written at the end of
`mmtune test`/`mmtune evaluate` or later by `mmtune report RUN_DIR`, for any task family. Every
section is always present (a table of contents a reader can rely on); one whose data the run did not
record says so in a short note, and one that fails to draw says why, without taking the others down.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmtune.evaluation.report import classification, continual, examples, results, summary
from mmtune.evaluation.report.collect import RunData, collect
from mmtune.evaluation.report.html import Section, esc, note, page
from mmtune.files import write_text_atomic

log = logging.getLogger("mmtune")

REPORT_FILE = "report.html"

# The sections in reading order: the verdict first (how good is it, against what, for whom, at what
# cost to what it knew), then the evidence behind it, then how it was trained, on what, with what settings.
SECTIONS: tuple[tuple[str, str, Callable[[RunData], Section]], ...] = (
    ("test", "Test results", results.test_section),
    ("comparison", "Tuned against baseline", results.comparison_section),
    ("subgroups", "Subgroups", results.subgroups_section),
    ("retention", "Retention (forgetting checks)", results.retention_section),
    ("continual", "Continual stages", continual.continual_section),
    ("confusion", "Confusion matrix", classification.confusion_section),
    ("curves", "ROC and precision-recall", classification.ranking_section),
    ("calibration", "Calibration", classification.calibration_section),
    ("errors", "Worst errors", classification.errors_section),
    ("samples", "Sample outputs", examples.samples_section),
    ("retrieval", "Retrieval examples", examples.retrieval_section),
    ("training", "Training", summary.training_section),
    ("data", "Data", summary.data_section),
    ("config", "Configuration", summary.config_section),
)
SECTION_IDS = tuple(sid for sid, _, _ in SECTIONS)


@dataclass
class Report:
    """A built report: the page and what the run has not recorded (`missing`, one line per part)."""

    run_dir: Path
    html: str
    missing: list[str]

    @property
    def path(self) -> Path:
        return self.run_dir / REPORT_FILE

    def write(self) -> Path:
        """Writes `report.html` atomically (a reader never sees half a page)."""
        return write_text_atomic(self.path, self.html)


def _section(section_id: str, title: str, build: Callable[[RunData], Section], run: RunData) -> Section:
    try:
        return build(run)
    except Exception as err:  # noqa: BLE001 - one malformed entry must not take the other sections down
        log.warning("[mmtune] report: the %s section could not be drawn: %s: %s", section_id, type(err).__name__, err)
        return Section(section_id, title,
                       missing=f"the {section_id} section could not be drawn from this run's files "
                               f"({type(err).__name__}: {err})"[:400])


def build_report(run_dir: Path) -> Report:
    """Reads a run directory and builds its report page.

    Raises:
        ConfigError: `run_dir` is not a run directory.
    """
    run = collect(Path(run_dir))
    sections = [_section(sid, title, build, run) for sid, title, build in SECTIONS]
    head = summary.header(run)
    if run.problems:
        head += note("Some files could not be read: " + "; ".join(run.problems), "warn")
    from mmtune import __version__ as version  # noqa: PLC0415 - the package's own version, for the footer

    footer = (f"Written by mmtune {esc(version)} on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from the files in "
              f"{esc(run.run_dir)}; rebuild it with <code>mmtune report {esc(run.run_dir)}</code>.")
    html = page(f"mmtune report: {run.name}", head, sections, footer)
    missing = [s.missing for s in sections if s.missing] + run.problems
    return Report(run.run_dir, html, missing)


def write_report(run_dir: Path) -> Path:
    """Builds and writes `<run_dir>/report.html`; returns its path.

    Raises:
        ConfigError: `run_dir` is not a run directory.
    """
    return build_report(run_dir).write()


__all__ = ["REPORT_FILE", "SECTION_IDS", "Report", "build_report", "write_report"]

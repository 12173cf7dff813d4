"""The `evaluation:` section of a config: how test results are judged (a CLI-level section, like
`run_name`: tasks never see it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmtune.evaluation.bootstrap import BootstrapSpec


@dataclass
class EvaluationSpec:
    """How `mmtune test` and `mmtune evaluate` judge a model.

    Args:
        bootstrap: resamples, confidence and seed of every interval.
        subgroups: metadata columns of the test data (manifest or dataset columns such as `sex`,
            `age_band`, `site`, `scanner`) to audit the model on, group by group.
        min_group_size: groups with fewer test samples are shown and flagged, never dropped.
        report: write `report.html` in the run directory at the end of test and evaluate.
    """

    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)
    subgroups: list[str] = field(default_factory=list)
    min_group_size: int = 30
    report: bool = True

"""`mmtune data align`: flags and YAML (jsonargparse) mapped onto `AlignSpec`, then the aligner.

This is the only place that reads the aligner's YAML. The spec's fields are top-level options
(`--images`, `--key`, `--policy.empty_text error`), so a config file is the same names as a mapping.
Parse errors become a ConfigError, which `mmtune.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import datasets
from jsonargparse import ActionConfigFile, ArgumentParser

from mmtune.data.align.pipeline import align_to_disk
from mmtune.data.align.report import format_summary
from mmtune.data.align.spec import AlignSpec


def build_parser() -> ArgumentParser:
    """The `mmtune data align` parser: `--config`, every `AlignSpec` field, and `--out`."""
    parser = ArgumentParser(prog="mmtune data align", exit_on_error=False,
                            description="Join image files and texts by key, check and split them, and write a "
                                        "datasets DatasetDict plus align_report.json.")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of the options below")
    parser.add_class_arguments(AlignSpec, None, as_group=False)
    parser.add_argument("--out", type=str, required=True, help="Output folder (DatasetDict + align_report.json)")
    return parser


def parse_spec(argv: list[str]) -> tuple[AlignSpec, str]:
    """Parses flags and config files into an `AlignSpec` and the output folder.

    Raises:
        ConfigError: an unknown option or key, a wrong type, a missing required option, or a config
            file that does not exist (the message is jsonargparse's, on one line).
    """
    from mmtune.cli_errors import parse_or_explain

    cfg, init = parse_or_explain(build_parser(), argv, instantiate=True)
    spec = AlignSpec(**{f.name: init[f.name] for f in dataclasses.fields(AlignSpec)})
    return spec, cfg.out


def run(argv: Optional[list[str]] = None) -> Path:
    """Runs `mmtune data align ARGV`: aligns, writes the data set and report, prints a summary.

    Returns:
        The path of the written report.
    """
    spec, out = parse_spec(list(argv or []))
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the summary below is the terminal output; per-split save bars clutter it
    try:
        _, report, report_path = align_to_disk(spec, out)
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()
    print(format_summary(report, out))
    print(f"  report: {report_path}")
    return report_path

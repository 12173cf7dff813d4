"""`mmtune continual --config task.yaml [--continual stages.yaml]`: stage after stage, forgetting measured."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from mmtune.errors import ConfigError


def read_configs(task_yaml: str, continual_yaml: Optional[str]):
    from mmtune.continual.spec import continual_spec

    path = Path(task_yaml)
    if not path.is_file():
        raise ConfigError(f"--config {task_yaml}: file not found")
    config = yaml.safe_load(path.read_text()) or {}
    section = config.pop("continual", None)
    if continual_yaml:
        other = Path(continual_yaml)
        if not other.is_file():
            raise ConfigError(f"--continual {continual_yaml}: file not found")
        loaded = yaml.safe_load(other.read_text()) or {}
        section = loaded.get("continual", loaded)
    if section is None:
        raise ConfigError("mmtune continual: no continual: section (in the task YAML or --continual FILE)")
    return config, continual_spec(section)


def main(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune continual", description="Continual fine-tuning: stages one after another, "
                            "with replay, class-incremental heads and LwF; forgetting measured after every stage.")
    parser.add_argument("--config", type=str, required=True, help="The task YAML (as for mmtune fit)")
    parser.add_argument("--continual", type=Optional[str], default=None, help="A YAML with the continual: section")
    parser.add_argument("--runs_dir", type=str, default="runs")
    parser.add_argument("--run_name", type=Optional[str], default=None)
    from mmtune.cli_errors import parse_or_explain

    args = parse_or_explain(parser, argv)
    from mmtune.continual.run import run_continual
    from mmtune.federated.cli import new_run_dir

    config, spec = read_configs(args.config, args.continual)
    run_dir = new_run_dir(args.runs_dir, args.run_name or f"{Path(args.config).stem}_continual")
    run_dir.mkdir(parents=True)
    summary = run_continual(config, spec, run_dir)
    print(f"[mmtune] continual: {len(summary['stages'])} stages; accuracy matrix {summary['accuracy_matrix']}; "
          f"average forgetting {summary['average_forgetting']}, backward transfer {summary['backward_transfer']}")
    from mmtune.evaluation.report import write_report

    report = write_report(run_dir)
    print(f"[mmtune] run: {run_dir} (continual.json, metrics.json, checkpoints/); report: {report}")

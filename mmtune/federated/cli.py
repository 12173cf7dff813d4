"""`mmtune federated`: the server of a federation, or a whole federation simulated on one machine.

    mmtune federated --config task.yaml [--federated fed.yaml] --simulate 4 --partition_by site
    mmtune federated --config task.yaml --superlink 127.0.0.1:9091      (see README: SuperLink/SuperNodes)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import yaml

from mmtune.errors import ConfigError

log = logging.getLogger("mmtune")


def new_run_dir(runs_dir: str, name: str) -> Path:
    base = Path(runs_dir) / name
    numbers = [int(m.group(1)) for p in base.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return base / f"version_{max(numbers, default=-1) + 1}"


def simulate(config_path: str, federated_path: Optional[str], sites: int, partition_by: Optional[str],
             runs_dir: str = "runs", run_name: Optional[str] = None, handler=None) -> tuple[Path, dict]:
    """Splits the task's data into `sites` sites and runs the federation in this process.
    `handler` (tests) wraps how a site answers a message. Returns the run directory and the report."""
    from mmtune.federated import client
    from mmtune.federated.server import run_federation
    from mmtune.federated.simulation import InProcessGrid, data_args, site_contexts, split_into_sites
    from mmtune.federated.spec import read_configs

    config, spec = read_configs(config_path, federated_path)
    sim = spec.simulation
    sites = sites or sim.sites
    if sites < 1:
        raise ConfigError("mmtune federated: give --simulate N (sites) or --superlink ADDRESS")
    run_dir = new_run_dir(runs_dir, run_name or f"{Path(config_path).stem}_federated")
    run_dir.mkdir(parents=True)
    init = data_args(config)
    pooled, manifests = split_into_sites(
        Path(init["path"]), run_dir / "data", sites, partition_by or sim.partition_by,
        tuple(init.get("split") or (0.7, 0.15, 0.15)), int(init.get("seed", 42)), sim.alpha, sim.seed,
        init.get("group_column"), init.get("label_column", "label"), init.get("label_separator", "|"),
        bool(init.get("stratify", True)))
    task_config = dict(config)
    task_config["data"] = {**config["data"], "init_args": {**init, "path": str(pooled)}}
    task_yaml = run_dir / "task.yaml"  # what every site and the server build: the task config, pooled data
    task_yaml.write_text(yaml.safe_dump(task_config, sort_keys=False))
    (run_dir / "federated.yaml").write_text(yaml.safe_dump({"federated": _plain(spec)}, sort_keys=False))
    client.forget_sites()
    grid = InProcessGrid(client.app, site_contexts(task_yaml, manifests, run_dir), handler)
    server_data = spec.test_path or str(pooled)
    try:
        report = run_federation(grid, task_config, spec, run_dir, server_data)
    finally:
        client.forget_sites()
    return run_dir, report


def _plain(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)


def main(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune federated", description="Federated fine-tuning on Flower: sites train the "
                            "task YAML on their own data, only trainable tensors travel.")
    parser.add_argument("--config", type=str, required=True, help="The task YAML (as for mmtune fit)")
    parser.add_argument("--federated", type=Optional[str], default=None,
                        help="A YAML with the federated: section (else the task YAML's own federated: section)")
    parser.add_argument("--simulate", type=int, default=0, help="Simulate N sites on this machine")
    parser.add_argument("--partition_by", type=Optional[str], default=None,
                        help="Manifest column naming the sites, or `dirichlet` (seeded non-IID label split)")
    parser.add_argument("--runs_dir", type=str, default="runs", help="Root folder of all runs")
    parser.add_argument("--run_name", type=Optional[str], default=None, help="Run name (default: <config>_federated)")
    from mmtune.cli_errors import parse_or_explain

    args = parse_or_explain(parser, argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_dir, report = simulate(args.config, args.federated, args.simulate, args.partition_by, args.runs_dir,
                               args.run_name)
    last = report["rounds"][-1] if report["rounds"] else {}
    share = report["bytes_per_message"]["share"]
    print(f"[mmtune] federated: {len(report['sites'])} sites, {len(report['rounds']) - 1} rounds; "
          f"global test {last.get('global_test')}; a message holds {share:.2%} of the full model's bytes")
    print(f"[mmtune] run: {run_dir} (federated.json, rounds.csv); global model: {report['final']['checkpoint']}")

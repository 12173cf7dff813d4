"""The Flower apps a real deployment loads: `server_app` runs on the SuperLink's side, `client_app`
on each SuperNode. `write_flower_app` writes the small Flower App folder `flwr run` submits: it names
these two components and carries the run config (the task YAML and federated YAML paths, the run
directory), which must exist on the server; each SuperNode names its own data in `--node-config`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mmtune.federated.client import app as client_app

log = logging.getLogger("mmtune")

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from mmtune.federated.server import run_federation
    from mmtune.federated.spec import read_configs

    run = context.run_config
    config, spec = read_configs(str(run["task-config"]), str(run.get("federated-config") or "") or None)
    run_dir = Path(str(run.get("run-dir") or "runs/federated"))
    report = run_federation(grid, config, spec, run_dir, spec.test_path)
    log.info("[mmtune] federated run done: %s", report.get("final"))


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "mmtune federated fine-tuning"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mmtune"

[tool.flwr.app.components]
serverapp = "mmtune.federated.app:server_app"
clientapp = "mmtune.federated.app:client_app"

[tool.flwr.app.config]
task-config = "{task}"
federated-config = "{federated}"
run-dir = "{run_dir}"
"""


def write_flower_app(folder: Path, task_config: str, federated_config: str, run_dir: str, name: str = "mmtune-federated") -> Path:
    """Writes `folder/pyproject.toml`, the Flower App `flwr run folder <superlink>` submits."""
    folder.mkdir(parents=True, exist_ok=True)
    text = PYPROJECT.format(name=name, task=Path(task_config).resolve(), run_dir=Path(run_dir).resolve(),
                            federated=Path(federated_config).resolve() if federated_config else "")
    (folder / "pyproject.toml").write_text(text)
    return folder


__all__ = ["client_app", "server_app", "write_flower_app"]

"""A real Flower deployment on localhost: one SuperLink, two SuperNodes, `flwr run` of mmtune's app."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_color_set, write_config

pytest.importorskip("flwr")
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Returns as soon as something listens on `port` (instead of a fixed sleep)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flwr's commands are not installed")
def test_superlink_and_two_supernodes_run_two_rounds(tmp_path, tiny_models):
    from mmtune.federated.app import write_flower_app

    manifest = make_color_set(tmp_path / "data", per_class=6)
    rows = list(csv.DictReader(manifest.open()))
    sites = []
    for k in range(2):  # each site's own manifest, as each machine would hold
        path = tmp_path / f"site{k}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "path": str((manifest.parent / r["path"]).resolve())} for r in rows[k::2])
        sites.append(path)
    task = write_config(tmp_path / "task.yaml", tiny_models["vit"], manifest,
                        model_args={"adapter": {"method": "lora", "r": 4}},
                        data_args={"group_column": None, "verify_images": False}, trainer={"max_epochs": 1})
    fed = tmp_path / "fed.yaml"
    # No site-side evaluation: in flwr 1.42 every message starts a fresh ClientApp process (torch, Lightning
    # and the site's task built again), so evaluate messages would add a process per site and round; the
    # server still scores every round on its test set, and the rounds' train messages are what is asserted.
    # min_sites: 2 makes the server wait for both SuperNodes before it asks the sites (no fixed sleep here)
    fed.write_text(yaml.safe_dump({"federated": {"rounds": 2, "min_sites": 2, "fraction_evaluate": 0.0,
                                                 "test_path": str(manifest)}}))
    run_dir = tmp_path / "run"
    app = write_flower_app(tmp_path / "app", str(task), str(fed), str(run_dir))
    home = tmp_path / "flwr_home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, *args):
        out = (logs / f"{name}.log").open("w")
        # cwd: Flower keeps even its "in-memory" state as SQLite files in the working directory
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=logs))

    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link_port),
              "--database", ":flwr-in-memory-state:")
        _wait_for_port(link_port, procs[0], logs / "superlink.log")  # flwr 1.42: one HTTP port for all APIs
        for k, path in enumerate(sites):
            start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(_free_port()), "--node-config", f"site-name='site_{k}' data-path='{path}'")
        subprocess.run([str(BIN / "flwr"), "run", str(app), "test"], env=env, check=True, timeout=120,
                       capture_output=True)
        ckpt = run_dir / "checkpoints" / "global.ckpt"
        deadline = time.time() + 600
        while not ckpt.is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert ckpt.is_file(), (logs / "superlink.log").read_text()[-3000:]
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    report = yaml.safe_load((run_dir / "federated.json").read_text())
    assert set(report["sites"]) == {"site_0", "site_1"}
    trained = [r for r in report["rounds"] if r["round"] > 0]
    assert len(trained) == 2 and all(set(r["sites"]) == {"site_0", "site_1"} for r in trained)
    assert all(r["bytes_received"] > 0 for r in trained)

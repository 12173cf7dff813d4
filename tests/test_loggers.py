"""`trainer.logger` beside mmtune's run directory: a tiny fit logged to a local MLflow file store and
read back with the MLflow client, while the run folder keeps its own metrics.csv and checkpoints."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import only_version, run_cli, write_config

pytest.importorskip("mlflow")


def test_mlflow_file_store_round_trip(tmp_path, tiny_models, color_set, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # mmtune sets it for a file store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"file:{tmp_path / 'mlruns'}"
    logger = {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
              "init_args": {"experiment_name": "tiny", "tracking_uri": store}}
    cfg = write_config(tmp_path / "mlf.yaml", tiny_models["vit"], color_set,
                       trainer={"max_epochs": 2, "log_every_n_steps": 1, "logger": logger})
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)

    run = only_version(runs, "mlf")  # the run folder is mmtune's as without the extra logger
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "config.yaml").is_file()
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    csv_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert csv_losses and list(run.glob("events.out.tfevents.*"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tiny")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [round(m.value, 5) for m in sorted(history, key=lambda m: m.step)] == [round(v, 5) for v in csv_losses]
    assert mlrun.data.metrics["val/accuracy"] == pytest.approx(json.loads((run / "metrics.json").read_text())
                                                              ["fit"]["metrics"]["val/accuracy"], abs=1e-6)
    assert mlrun.data.params.get("optimizer") or mlrun.data.params  # the task's hyperparameters went too

    # an evaluation verb with the same logger: its outputs stay in the run folder
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best")
    assert "test" in json.loads((run / "metrics.json").read_text())
    assert not (tmp_path / "mlruns" / "metrics.json").exists()
    tested = [r for r in client.search_runs([experiment.experiment_id]) if "test/accuracy" in r.data.metrics]
    assert tested

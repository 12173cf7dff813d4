"""A run directory is never damaged by another command (issue 11, item 6): a failing fit from another
run's checkpoint touches nothing of that run, a resume appends to the run's logs, evaluation verbs keep
the fit's config.yaml, failed setups leave no folders, `max_steps` shorter than an epoch still validates
and saves, and a misspelled `timm:` name gets suggestions."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from conftest import only_version, run_cli, write_config
from support.killer import fit_process, with_callback



def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _lora(tmp_path, model_dir, data, name, epochs=2, **trainer):
    return write_config(tmp_path / f"{name}.yaml", model_dir, data, model_args={"adapter": {"method": "lora", "r": 4}},
                        trainer={"max_epochs": epochs, **trainer})


def test_failing_fit_from_another_runs_checkpoint_touches_nothing_of_that_run(tmp_path, tiny_models, color_set, capsys):
    runs = tmp_path / "runs"
    run_cli("fit", "--config", _lora(tmp_path, tiny_models["vit"], color_set, "vit", epochs=1), "--runs_dir", runs)
    vit_run = only_version(runs, "vit")
    before = _snapshot(vit_run)
    assert "metrics.csv" in before and "config.yaml" in before

    cnn = _lora(tmp_path, tiny_models["cnn"], color_set, "cnn")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cnn, "--runs_dir", runs, "--ckpt_path", vit_run / "checkpoints" / "last.ckpt")
    assert exit_info.value.code == 2
    assert "the checkpoint does not fit this model" in capsys.readouterr().err
    assert _snapshot(vit_run) == before  # nothing deleted, replaced, added or rewritten
    assert not (runs / "cnn").exists()  # and the failed fit left no folder of its own


def test_fit_from_another_runs_checkpoint_gets_its_own_version(tmp_path, tiny_models, color_set):
    """Starting from another run's checkpoint is a new run: its logs go to a version of its own name."""
    runs = tmp_path / "runs"
    run_cli("fit", "--config", _lora(tmp_path, tiny_models["vit"], color_set, "first", epochs=1), "--runs_dir", runs)
    first = only_version(runs, "first")
    before = _snapshot(first)
    run_cli("fit", "--config", _lora(tmp_path, tiny_models["vit"], color_set, "second", epochs=2), "--runs_dir", runs,
            "--ckpt_path", first / "checkpoints" / "last.ckpt")
    second = only_version(runs, "second")
    assert _snapshot(first) == before
    assert (second / "checkpoints" / "last.ckpt").is_file()
    # restored from the first run's training state: only its second epoch is trained here
    assert {r["epoch"] for r in _rows(second / "metrics.csv") if r.get("val/loss")} == {"1"}


def _train_rows(path: Path) -> list[tuple]:
    """(epoch, step, metric, value) of every logged value except timing-dependent ones."""
    out = []
    for row in _rows(path):
        for key, value in row.items():
            if value != "" and key not in ("epoch", "step"):
                out.append((row["epoch"], row["step"], key, float(value)))
    return sorted(out)


def test_resume_after_kill_appends_to_metrics_csv(tmp_path, tiny_models, color_set):
    """A resumed run's metrics.csv holds every epoch, the same rows as an uninterrupted run's."""
    runs = tmp_path / "runs"
    trainer = {"log_every_n_steps": 1}
    straight = _lora(tmp_path, tiny_models["vit"], color_set, "straight", epochs=3, **trainer)
    run_cli("fit", "--config", straight, "--runs_dir", runs)
    expected = _train_rows(only_version(runs, "straight") / "metrics.csv")

    resumable = _lora(tmp_path, tiny_models["vit"], color_set, "resumable", epochs=3, **trainer)
    killing = with_callback(resumable, tmp_path / "killing.yaml", "support.killer.KillAtEpoch", epoch=2)
    killed = fit_process(runs, "resumable", "--config", killing)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = only_version(runs, "resumable")
    logged = _rows(run / "metrics.csv")  # flushed at each checkpoint, so a kill loses no epoch before it
    assert {r["epoch"] for r in logged if r.get("val/loss")} == {"0", "1"}

    resumed = fit_process(runs, "resumable", "--config", resumable, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _train_rows(run / "metrics.csv")
    assert [r[:3] for r in got] == [r[:3] for r in expected]  # every epoch, each row once
    for (_, _, key, value), (_, _, _, want) in zip(got, expected):
        assert value == pytest.approx(want, rel=1e-4, abs=1e-6), key


def test_resume_of_a_finished_run_for_more_epochs_keeps_the_first_epochs(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    cfg = _lora(tmp_path, tiny_models["vit"], color_set, "longer", epochs=1)
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "longer")
    first = _rows(run / "metrics.csv")
    config = (run / "config.yaml").read_text()
    run_cli("fit", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "last", "--trainer.max_epochs", "3")
    assert only_version(runs, "longer") == run
    rows = _rows(run / "metrics.csv")
    assert rows[:len(first)] == [{**r, **{k: "" for k in rows[0] if k not in r}} for r in first]
    assert {r["epoch"] for r in rows if r.get("val/loss")} == {"0", "1", "2"}
    assert (run / "config.yaml").read_text() == config  # the run's origin stays
    assert yaml.safe_load((run / "resume_config.yaml").read_text())["trainer"]["max_epochs"] == 3


def test_evaluation_verbs_write_their_config_beside_the_fits(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    cfg = _lora(tmp_path, tiny_models["vit"], color_set, "cfgs", epochs=1)
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "cfgs")
    fit_config = (run / "config.yaml").read_text()
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--trainer.max_epochs", "7")
    run_cli("validate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "last")
    run_cli("predict", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--data.predict_path", color_set.parent / "red")
    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best")
    assert (run / "config.yaml").read_text() == fit_config
    for verb in ("test", "validate", "predict", "evaluate"):
        saved = yaml.safe_load((run / f"{verb}_config.yaml").read_text())
        assert Path(saved["ckpt_path"]).name in ("best.ckpt", "last.ckpt"), verb
    assert yaml.safe_load((run / "test_config.yaml").read_text())["trainer"]["max_epochs"] == 7
    assert only_version(runs, "cfgs") == run


@pytest.mark.parametrize("broken", ["model", "data"])
def test_failed_setups_leave_no_run_folders(tmp_path, tiny_models, color_set, capsys, broken):
    runs = tmp_path / "runs"
    model = "timm:vit_tiny_patch16_24" if broken == "model" else tiny_models["vit"]
    data = tmp_path / "missing.csv" if broken == "data" else color_set
    cfg = write_config(tmp_path / "broken.yaml", model, data)
    for _ in range(3):
        with pytest.raises(SystemExit):
            run_cli("fit", "--config", cfg, "--runs_dir", runs)
    assert "mmtune: error:" in capsys.readouterr().err
    assert not list(runs.rglob("version_*")) and not (runs / "broken").exists()
    # and a good fit after them is version_0
    run_cli("fit", "--config", _lora(tmp_path, tiny_models["vit"], color_set, "broken", epochs=1), "--runs_dir", runs)
    assert only_version(runs, "broken").name == "version_0"


def test_failed_test_leaves_no_folder(tmp_path, tiny_models, color_set, capsys):
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "never.yaml", tiny_models["vit"], tmp_path / "missing.csv")
    with pytest.raises(SystemExit):
        run_cli("test", "--config", cfg, "--runs_dir", runs)
    assert not runs.exists()


def test_max_steps_shorter_than_an_epoch_validates_and_saves(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    cfg = _lora(tmp_path, tiny_models["vit"], color_set, "smoke", epochs=5, max_steps=2)
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "smoke")
    best, last = (torch.load(run / "checkpoints" / name, weights_only=True) for name in ("best.ckpt", "last.ckpt"))
    assert best["global_step"] == last["global_step"] == 2
    assert any(r.get("val/loss") for r in _rows(run / "metrics.csv"))


def test_misspelled_timm_name_gets_close_names(tmp_path, color_set, capsys):
    cfg = write_config(tmp_path / "typo.yaml", "timm:resnet1", color_set)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmtune: error:")]
    assert "unknown model 'timm:resnet1'" in line and "Close names:" in line and "timm:resnet18" in line


def test_resumed_csv_log_drops_rows_logged_after_the_checkpoint(tmp_path):
    """Rows flushed between the checkpoint and the kill are logged again by the resumed run: the
    writer drops them (steps from the checkpoint's global step on) instead of keeping them twice."""
    from mmtune.run_directory import RunCSVLogger

    run = tmp_path / "runs" / "r" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,step,train/loss\n" + "".join(f"{s // 4},{s},{s / 10}\n" for s in range(10)))
    logger = RunCSVLogger(str(tmp_path / "runs"), name="r", version=0, resume_step=8)
    logger.log_metrics({"train/loss": 0.8, "epoch": 2}, step=8)
    logger.save()
    assert len(_rows(run / "metrics.csv")) == 10  # nothing written before the run is opened
    logger.open_run()
    logger.log_metrics({"train/loss": 0.75, "val/loss": 0.7, "epoch": 2}, step=8)
    logger.save()
    rows = _rows(run / "metrics.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(8)] + ["8", "8"]
    assert rows[-1]["val/loss"] == "0.7" and rows[0]["val/loss"] == ""

"""fit, test and predict through the `mmtune` CLI on tiny ViT and CNN configs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import only_version, run_cli, write_config


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch,adapter", [("vit", {"method": "lora", "r": 4, "alpha": 8}), ("cnn", {"method": "none"})])
def test_fit_test_predict(tmp_path, tiny_models, color_set, arch, adapter):
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / f"{arch}.yaml", tiny_models[arch], color_set,
                       model_args={"adapter": adapter}, trainer={"max_epochs": 4})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, arch)
    for name in ("config.yaml", "metrics.csv", "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard log missing"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["fit"]["monitor"] == "val/loss"
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] or adapter["method"] == "none"
    assert summary["fit"]["metrics"]["val/accuracy"] > 0.6  # three color classes are easy

    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best")
    summary = json.loads((run / "metrics.json").read_text())
    test = summary["test"]["metrics"]
    for key in ("test/accuracy", "test/f1_macro", "test/auroc_macro", "test/auroc/red",
                "test/sensitivity/green", "test/specificity/blue"):
        assert key in test, key
    assert "fit" in summary, "test must not erase the fit summary"
    matrix = _read_csv(run / "confusion_matrix.csv")
    assert [r["true \\ predicted"] for r in matrix] == ["blue", "green", "red"]
    assert sum(int(v) for r in matrix for k, v in r.items() if k != "true \\ predicted") > 0
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    assert len(_read_csv(run / "metrics.csv")) > 0, "the fit's metrics.csv must survive evaluation"

    run_cli("predict", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--data.predict_path", color_set.parent / "red")
    rows = _read_csv(run / "predictions.csv")
    assert len(rows) == 16
    assert set(rows[0]) == {"path", "prediction", "p_blue", "p_green", "p_red"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("blue", "green", "red")) - 1) < 1e-4 for r in rows)
    assert sum(r["prediction"] == "red" for r in rows) >= 12


def test_multilabel_fit_and_predict(tmp_path, tiny_models, multilabel_set):
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "ml.yaml", tiny_models["vit"], multilabel_set,
                       model_args={"adapter": {"method": "lora", "r": 4}, "thresholds": [0.5, 0.4, 0.6],
                                   "class_weights": "balanced"},
                       data_args={"group_column": "patient"}, trainer={"max_epochs": 3})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "ml")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert ckpt["multi_label"] is True
    assert ckpt["classes"] == ["blue", "green", "red"]
    assert isinstance(ckpt["class_weights"], list) and len(ckpt["class_weights"]) == 3
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "last")
    matrix = _read_csv(run / "confusion_matrix.csv")
    assert [r["label"] for r in matrix] == ["blue", "green", "red"] and set(matrix[0]) == {"label", "tn", "fp", "fn", "tp"}
    run_cli("predict", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "last", "--data.predict_path", multilabel_set)
    rows = _read_csv(run / "predictions.csv")
    assert len(rows) == 60
    for row in rows:  # the prediction is exactly the set of classes over their own threshold
        expected = [c for c, t in zip(("blue", "green", "red"), (0.5, 0.4, 0.6)) if float(row[f"p_{c}"]) >= t]
        assert row["prediction"] == "|".join(expected)


def test_print_config_and_dotted_override(tmp_path, tiny_models, color_set, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_models["vit"], color_set, model_args={"adapter": {"method": "lora"}})
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, "--model.init_args.adapter.r", "2", "--print_config")
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    adapter = printed["model"]["init_args"]["adapter"]
    assert adapter["method"] == "lora" and adapter["r"] == 2
    assert printed["model"]["init_args"]["optimizer"]["schedule"] == "cosine"  # defaults are shown
    assert printed["data"]["init_args"]["augment"]["hflip"] == 0.5


def test_unknown_config_key_is_named(tmp_path, tiny_models, color_set, capsys):
    cfg = write_config(tmp_path / "bad.yaml", tiny_models["vit"], color_set, model_args={"adapter": {"rank": 4}})
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    assert exit_info.value.code == 2
    assert "rank" in capsys.readouterr().err


def test_unknown_timm_name_suggests_close_names(tmp_path, color_set, capsys):
    cfg = write_config(tmp_path / "typo.yaml", "vit_tiny_patch16_24", color_set)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'vit_tiny_patch16_24'" in err and "vit_tiny_patch16_224" in err
    assert "Traceback" not in err


def test_pretrained_offline_says_how_to_use_a_local_path(tmp_path, color_set, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(tmp_path / "hub.yaml", "timm:test_vit", color_set)
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    err = capsys.readouterr().err
    assert "could not fetch pretrained weights for 'timm:test_vit'" in err and "model.checkpoint" in err

"""Exports to the edge: the preprocessing sidecar, native configs that carry the training
preprocessing, ONNX and ExecuTorch files verified in their own runtimes, int8, and predict on an export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_color_set, only_version, run_cli, write_config


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def wide_colors(tmp_path_factory) -> Path:
    """The color set with rectangular 40x28 images, so resize and center crop are exercised."""
    root = tmp_path_factory.mktemp("wide")
    manifest = make_color_set(root, per_class=16)
    for png in root.glob("*/*.png"):
        Image.open(png).resize((40, 28)).save(png)
    return manifest


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory, tiny_models, wide_colors) -> Path:
    """A tiny timm CNN fitted through the CLI at image_size 24 (its base config says another size),
    so its checkpoint sits in a run directory with the fit's config.yaml."""
    root = tmp_path_factory.mktemp("cnn_run")
    cfg = write_config(root / "cnn.yaml", tiny_models["cnn"], wide_colors,
                       model_args={"monitor": {"early_stopping": False}},
                       data_args={"image_size": 24, "split": [0.5, 0.25, 0.25]}, trainer={"max_epochs": 3})
    run_cli("fit", "--config", cfg, "--runs_dir", root / "runs")
    return only_version(root / "runs", "cnn") / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoint_predictions(tmp_path_factory, trained_cnn, wide_colors) -> list[dict]:
    root = tmp_path_factory.mktemp("ckpt_predict")
    run_dir = trained_cnn.parent.parent
    out = root / "predictions.csv"
    run_cli("predict", "--config", run_dir / "config.yaml", "--ckpt_path", trained_cnn,
            "--data.predict_path", wide_colors.parent, "--model.predictions_file", out, "--runs_dir", root / "runs")
    return _read_csv(out)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, trained_cnn) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "exported"
    run_cli("export", "--ckpt_path", trained_cnn, "--out", out, "--format", "onnx")
    return out


def test_sidecar_records_training_preprocessing(onnx_export, trained_cnn):
    sidecar = json.loads((onnx_export / "preprocessing.json").read_text())
    prep = sidecar["preprocessing"]
    assert prep["input_size"] == [3, 24, 24] and prep["crop_pct"] == 1.0  # the run's image_size, not the base's
    assert sidecar["classes"] == ["blue", "green", "red"]
    assert sidecar["postprocessing"]["temperature"] == pytest.approx(1.0)
    report = json.loads((onnx_export / "export_report.json").read_text())
    check = report["verification"]
    assert check["split"] == "val" and check["images"] > 0
    assert check["max_abs_diff"] < 1e-3 and check["label_agreement"] == 1.0
    assert report["test_accuracy"]["trained"] == report["test_accuracy"]["exported"]


def test_sidecar_alone_preprocesses_like_mmtune(onnx_export, trained_cnn, wide_colors):
    """PIL + numpy from the JSON give the pixels mmtune's own evaluation transform gives."""
    from mmtune.data.transforms import AugmentSpec, build_transform
    from mmtune.tasks.common import load_task

    prep = json.loads((onnx_export / "preprocessing.json").read_text())["preprocessing"]
    task = load_task(str(trained_cnn))
    transform = build_transform(task.data_config, False, AugmentSpec(), 24)
    for png in sorted(wide_colors.parent.glob("*/*.png"))[:5]:
        image = Image.open(png).convert(prep["channel_order"])
        resized = image.resize((prep["resize_shorter_side"] * image.width // min(image.size),
                                prep["resize_shorter_side"] * image.height // min(image.size)),
                               {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[prep["interpolation"]])
        c, h, w = prep["input_size"]
        top, left = round((resized.height - h) / 2), round((resized.width - w) / 2)
        x = np.asarray(resized.crop((left, top, left + w, top + h)), np.float32) * prep["scale"]
        x = ((x - prep["mean"]) / prep["std"]).transpose(2, 0, 1)
        np.testing.assert_allclose(x, transform(image).numpy(), atol=1e-5)


def test_predict_on_onnx_gives_the_checkpoints_labels(onnx_export, wide_colors, checkpoint_predictions, tmp_path):
    out = tmp_path / "onnx_predictions.csv"
    run_cli("predict", "--model", onnx_export / "model.onnx", "--data", wide_colors.parent, "--out", out)
    from_onnx = {r["path"]: r for r in _read_csv(out)}
    assert len(from_onnx) == len(checkpoint_predictions) == 48
    for row in checkpoint_predictions:
        assert from_onnx[row["path"]]["prediction"] == row["prediction"]
        assert abs(float(from_onnx[row["path"]]["p_red"]) - float(row["p_red"])) < 1e-4
    assert list(from_onnx[row["path"]]) == list(row)  # the same columns


def test_predict_refuses_another_input_size(onnx_export, wide_colors, tmp_path, capsys):
    """The ONNX file takes any batch but the size it was traced at; another size is a clear error."""
    import onnx

    model = onnx.load(str(onnx_export / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 24, 24]
    with pytest.raises(SystemExit):
        run_cli("predict", "--model", onnx_export / "model.onnx", "--data", wide_colors.parent,
                "--out", tmp_path / "p.csv", "--image_size", 32)
    err = capsys.readouterr().err
    assert "takes images of 3x24x24" in err and "3x32x32" in err and "Traceback" not in err


def test_native_timm_export_carries_training_preprocessing(trained_cnn, wide_colors, checkpoint_predictions, tmp_path):
    """timm's own resolve_data_config + create_transform on the export give mmtune's labels."""
    import timm

    out = tmp_path / "native"
    run_cli("export", "--ckpt_path", trained_cnn, "--out", out)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    resolved = timm.data.resolve_data_config(model=model)
    assert resolved["input_size"] == (3, 24, 24) and resolved["crop_pct"] == 1.0  # the base config says otherwise
    transform = timm.data.create_transform(**resolved)
    expected = {r["path"]: r["prediction"] for r in checkpoint_predictions}
    classes = json.loads((out / "config.json").read_text())["label_names"]
    paths = sorted(expected)[::4]
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        labels = [classes[i] for i in model(batch).argmax(1).tolist()]
    assert labels == [expected[p] for p in paths]
    assert json.loads((out / "preprocessing.json").read_text())["preprocessing"]["input_size"] == [3, 24, 24]


def test_int8_onnx_keeps_most_labels(trained_cnn, tmp_path):
    out = tmp_path / "int8"
    run_cli("export", "--ckpt_path", trained_cnn, "--out", out, "--format", "onnx", "--quantize", "int8",
            "--min_agreement", 0.5)
    report = json.loads((out / "export_report.json").read_text())
    assert report["quantize"] == "int8"
    assert report["verification"]["label_agreement"] >= 0.75
    sizes = report["file_bytes"]
    assert sizes["int8_bytes"] < sizes["fp32_bytes"]
    acc = report["test_accuracy"]
    assert acc["exported"] >= acc["trained"] - 0.25


def test_int8_without_calibration_images_is_refused(tmp_path, tiny_models, color_set, capsys):
    import lightning as L

    from mmtune import AdapterSpec, ImageClassificationData, ImageClassificationTask, ModelSpec, MonitorSpec

    task = ImageClassificationTask(model=ModelSpec(name=str(tiny_models["cnn"])), adapter=AdapterSpec(),
                                   monitor=MonitorSpec(early_stopping=False))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, ImageClassificationData(path=str(color_set), batch_size=8, num_workers=0))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # no run config beside it: the training data is unknown
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "q", "--format", "onnx", "--quantize", "int8")
    err = capsys.readouterr().err
    assert "needs calibration images" in err and "--data" in err
    tiny = tmp_path / "tiny"
    make_color_set(tiny, per_class=2)
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "q", "--format", "onnx", "--quantize", "int8",
                "--data", tiny / "manifest.csv")
    assert "at least 8 are needed" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_executorch_export_runs_in_its_runtime_and_predicts(trained_cnn, wide_colors, checkpoint_predictions, tmp_path):
    out = tmp_path / "pte"
    run_cli("export", "--ckpt_path", trained_cnn, "--out", out, "--format", "executorch")
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["max_abs_diff"] < 1e-3 and report["verification"]["label_agreement"] == 1.0
    run_cli("predict", "--model", out / "model.pte", "--data", wide_colors.parent, "--out", tmp_path / "p.csv")
    from_pte = {r["path"]: r["prediction"] for r in _read_csv(tmp_path / "p.csv")}
    assert from_pte == {r["path"]: r["prediction"] for r in checkpoint_predictions}


@pytest.mark.slow
def test_executorch_int8_keeps_most_labels(trained_cnn, tmp_path):
    out = tmp_path / "pte8"
    run_cli("export", "--ckpt_path", trained_cnn, "--out", out, "--format", "executorch", "--quantize", "int8",
            "--min_agreement", 0.5)
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["label_agreement"] >= 0.75
    assert report["file_bytes"]["int8_bytes"] < report["file_bytes"]["fp32_bytes"]


def test_vit_onnx_export_agrees(tmp_path, tiny_models, color_set):
    cfg = write_config(tmp_path / "vit.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}, "monitor": {"early_stopping": False}},
                       trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    ckpt = only_version(tmp_path / "runs", "vit") / "checkpoints" / "last.ckpt"
    run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "vit_onnx", "--format", "onnx")
    check = json.loads((tmp_path / "vit_onnx" / "export_report.json").read_text())["verification"]
    assert check["split"] == "val" and check["max_abs_diff"] < 1e-3 and check["label_agreement"] == 1.0


def test_a_family_that_cannot_go_to_the_format_names_those_it_can(tmp_path, capsys):
    ckpt = tmp_path / "align.ckpt"
    torch.save({"mmtune_task": "causal_lm", "state_dict": {}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "x", "--format", "executorch")
    err = capsys.readouterr().err
    assert "causal_lm model cannot be exported to executorch; it can go to: safetensors" in err


def test_an_unsupported_operator_names_the_module_holding_it(tmp_path):
    from torch import nn

    from mmtune.errors import ExportError
    from mmtune.export.onnx_format import export_onnx

    @torch.library.custom_op("mmtune_test::wobble", mutates_args=())
    def wobble(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @wobble.register_fake
    def _(x):
        return torch.empty_like(x)

    class Wobbly(nn.Module):
        def forward(self, x):
            return wobble(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.odd, self.head = nn.Conv2d(3, 4, 3), Wobbly(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.odd(self.conv(x)).mean((2, 3)))

    with pytest.raises(ExportError) as info:
        export_onnx(Net().eval(), torch.randn(2, 3, 8, 8), tmp_path / "odd.onnx")
    message = str(info.value)
    assert "mmtune_test.wobble" in message and "operator in module odd (Wobbly)" in message

"""Exports of image-text and text-embedding models: one ONNX file per tower with dynamic batch (and
sequence length), a sidecar and tokenizer files that are enough to embed without mmtune, verification
against the trained towers, and int8 text encoders scored by retrieval recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import only_version, run_cli, write_csv
from support.tiny_align import make_pair_set, save_tiny_clip, save_tiny_sentence_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(root: Path, name: str, model: Path, data_class: str, data_path: Path, adapter: dict) -> Path:
    config = {
        "model": {"class_path": "ImageTextAlignmentTask",
                  "init_args": {"model": {"name": str(model)}, "adapter": adapter,
                                "optimizer": {"lr": 5e-3, "warmup": 0.1},
                                "monitor": {"metric": "val/mean_recall", "mode": "max", "early_stopping": False}}},
        "data": {"class_path": data_class,
                 "init_args": {"path": str(data_path), "batch_size": 8, "num_workers": 0, "split": [0.5, 0.25, 0.25]}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_cli("fit", "--config", root / f"{name}.yaml", "--runs_dir", root / "runs", "--run_name", name)
    return only_version(root / "runs", name) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def clip_pairs(tmp_path_factory) -> Path:
    return make_pair_set(tmp_path_factory.mktemp("pairs"), per_kind=4)


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory, clip_pairs) -> Path:
    """A tiny CLIP with LoRA on both towers, fitted through the CLI (so the run's config.yaml names its data)."""
    root = tmp_path_factory.mktemp("clip_run")
    clip = save_tiny_clip(root / "clip")
    return _fit(root, "clip", clip, "ImageTextPairData", clip_pairs, {"method": "lora", "r": 4})


@pytest.fixture(scope="module")
def clip_onnx(tmp_path_factory, trained_clip) -> Path:
    out = tmp_path_factory.mktemp("clip_onnx") / "exported"
    run_cli("export", "--ckpt_path", trained_clip, "--out", out, "--format", "onnx")
    return out


def test_clip_towers_are_verified_files_with_their_preprocessing(clip_onnx):
    assert {p.name for p in clip_onnx.iterdir()} >= {"image_encoder.onnx", "text_encoder.onnx", "preprocessing.json",
                                                     "export_report.json", "tokenizer"}
    report = json.loads((clip_onnx / "export_report.json").read_text())
    for tower in ("image_encoder", "text_encoder"):
        check = report["verification"][tower]
        assert check["split"] == "val" and check["items"] >= 8, check
        assert check["max_abs_diff"] < 1e-3 and check["min_cosine"] > 0.9999, check
    recall = report["retrieval_recall"]
    assert recall["pairs"] >= 8 and recall["exported"] == recall["trained"]
    assert set(recall["trained"]) == {"i2t_r@1", "t2i_r@1"}
    sidecar = json.loads((clip_onnx / "preprocessing.json").read_text())
    image = sidecar["preprocessing"]["image_encoder"]
    assert image["input_size"] == [3, 32, 32] and image["interpolation"] == "bicubic"
    assert image["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's, from its processor
    text = sidecar["preprocessing"]["text_encoder"]
    assert text["max_length"] == 16 and "L2" in text["normalize"]
    assert sidecar["towers"]["text_encoder"]["inputs"] == ["input_ids", "attention_mask"]
    import onnx

    def dims(file):
        graph = onnx.load(str(clip_onnx / file)).graph
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(graph.input) + list(graph.output)}

    assert dims("text_encoder.onnx") == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                                         "embeddings": ["batch", 16]}
    assert dims("image_encoder.onnx") == {"pixels": ["batch", 3, 32, 32], "embeddings": ["batch", 16]}


def _hand_pixels(path: Path, prep: dict) -> np.ndarray:
    """The sidecar's image steps in PIL + numpy."""
    image = Image.open(path).convert(prep["channel_order"])
    side = prep["resize_shorter_side"]
    scale = side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    c, h, w = prep["input_size"]
    top, left = round((image.height - h) / 2), round((image.width - w) / 2)
    x = np.asarray(image.crop((left, top, left + w, top + h)), np.float32) * prep["scale"]
    return ((x - prep["mean"]) / prep["std"]).transpose(2, 0, 1).astype(np.float32)


def test_the_files_embed_without_mmtune_like_the_trained_model(clip_onnx, trained_clip, clip_pairs):
    """onnxruntime + tokenizers + PIL from the folder alone give the trained model's embeddings, for any
    batch size and text length."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from mmtune.tasks.common import load_task

    sidecar = json.loads((clip_onnx / "preprocessing.json").read_text())
    image_file = ort.InferenceSession(str(clip_onnx / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text_file = ort.InferenceSession(str(clip_onnx / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    task = load_task(str(trained_clip)).eval()
    paths = sorted(clip_pairs.parent.glob("*.png"))[:3]
    pixels = np.stack([_hand_pixels(p, sidecar["preprocessing"]["image_encoder"]) for p in paths])
    with torch.no_grad():
        ours = task.embed_images(torch.stack([task.preprocess.image(Image.open(p).convert("RGB")) for p in paths]))
    np.testing.assert_allclose(image_file.run(None, {"pixels": pixels})[0], ours.numpy(), atol=1e-4)
    np.testing.assert_allclose(image_file.run(None, {"pixels": pixels[:1]})[0], ours[:1].numpy(), atol=1e-4)

    tokenizer = Tokenizer.from_file(str(clip_onnx / "tokenizer" / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    texts = ["red", "a photo of a big green circle", "a photo of the small blue square"]
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], np.int64)
    mask = np.array([e.attention_mask for e in encoded], np.int64)
    with torch.no_grad():
        ours = task.embed_texts(task.preprocess.text(texts)).numpy()
    np.testing.assert_allclose(text_file.run(None, {"input_ids": ids, "attention_mask": mask})[0], ours, atol=1e-4)
    short = tokenizer.encode("red")  # batch 1, 3 tokens: another batch size and sequence length
    alone = text_file.run(None, {"input_ids": np.array([short.ids], np.int64),
                                 "attention_mask": np.array([short.attention_mask], np.int64)})[0]
    np.testing.assert_allclose(alone[0], ours[0], atol=1e-4)


def test_clip_int8_quantizes_both_towers_and_keeps_their_embeddings(trained_clip, tmp_path):
    """The image tower through static QDQ calibrated on validation images, the text tower dynamic."""
    out = tmp_path / "int8"
    run_cli("export", "--ckpt_path", trained_clip, "--out", out, "--format", "onnx", "--quantize", "int8")
    report = json.loads((out / "export_report.json").read_text())
    for tower in ("image_encoder", "text_encoder"):
        sizes = report["file_bytes"][tower]
        assert sizes["int8_bytes"] < sizes["fp32_bytes"] / 2, sizes
        check = report["verification"][tower]
        assert check["mean_cosine"] >= 0.95 and check["required_mean_cosine"] == 0.95, check
    recall = report["retrieval_recall"]
    assert set(recall["exported"]) == {"i2t_r@1", "t2i_r@1"} and 0 <= recall["exported"]["i2t_r@1"] <= 1
    with pytest.raises(SystemExit):  # a bar the int8 towers cannot clear is an error, and nothing is written
        run_cli("export", "--ckpt_path", trained_clip, "--out", tmp_path / "strict", "--format", "onnx",
                "--quantize", "int8", "--min_cosine", 1.0)
    assert not (tmp_path / "strict").exists()


def test_a_dual_encoder_without_known_data_exports_both_towers_checked_on_random_inputs(tmp_path, tiny_models):
    from mmtune import ImageTextAlignmentTask, ModelSpec
    from mmtune.export.pipeline import ExportOptions
    from mmtune.export.source import ExportSource
    from mmtune.export.tower_export import export_towers
    from mmtune.export.towers import tower_preprocessing
    from support.tiny_align import save_tiny_bert

    task = ImageTextAlignmentTask(ModelSpec(name=str(tiny_models["vit"]), kwargs={"img_size": 32}),
                                  text_model=ModelSpec(name=str(save_tiny_bert(tmp_path / "bert"))), embed_dim=16)
    task.setup("test")
    report = export_towers(ExportSource(task, "image_text_alignment", tmp_path / "x.ckpt", None), tmp_path,
                           ExportOptions(format="onnx"), None)
    assert report["files"] == {"image_encoder": "image_encoder.onnx", "text_encoder": "text_encoder.onnx"}
    for check in report["verification"].values():
        assert check["split"] == "random inputs" and check["max_abs_diff"] < 1e-3
    assert report["retrieval_recall"] is None  # no pairs, no recall
    assert tower_preprocessing(task)["text_encoder"]["pooling"].startswith("mean over tokens")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_image_sidecar_preprocesses_like_the_familys_processor(family, tmp_path):
    """On a non-square image: CLIP resizes the shorter side and crops, SigLIP squashes to (H, W)."""
    from mmtune import ImageTextAlignmentTask, ModelSpec
    from mmtune.export.preprocessing import preprocess
    from mmtune.export.towers import tower_preprocessing
    from support.tiny_align import save_tiny_siglip

    model = (save_tiny_clip if family == "clip" else save_tiny_siglip)(tmp_path / family)
    task = ImageTextAlignmentTask(ModelSpec(name=str(model)))
    task.setup("test")
    prep = tower_preprocessing(task)["image_encoder"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (28, 44, 3), dtype=np.uint8))
    # within a few 8-bit levels (the processors round resized pixels); the other resize is off by > 1.8
    np.testing.assert_allclose(preprocess(image, prep), task.preprocess.image(image).numpy(), atol=0.05)


def test_predict_on_a_tower_says_it_runs_classifiers(clip_onnx, clip_pairs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("predict", "--model", clip_onnx / "image_encoder.onnx", "--data", clip_pairs.parent,
                "--out", tmp_path / "p.csv")
    assert "runs image classifiers; this export is 'image_text_alignment'" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_towers_go_to_executorch_from_the_cli_and_int8_there_is_refused(trained_clip, tmp_path, capsys):
    run_cli("export", "--ckpt_path", trained_clip, "--out", tmp_path / "pte", "--format", "executorch")
    report = json.loads((tmp_path / "pte" / "export_report.json").read_text())
    assert report["files"] == {"image_encoder": "image_encoder.pte", "text_encoder": "text_encoder.pte"}
    assert all(check["max_abs_diff"] < 1e-3 for check in report["verification"].values() if "max_abs_diff" in check)
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", trained_clip, "--out", tmp_path / "q", "--format", "executorch",
                "--quantize", "int8")
    assert "int8 of image-text and text-embedding towers is ONNX only" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_text_encoder_int8_reports_recall_before_and_after(tmp_path):
    rows = [(f"{size} {color} {shape}", f"a photo of the {size} {color} {shape}")
            for size in ("small", "big") for color in ("red", "green", "blue", "yellow")
            for shape in ("square", "circle")] * 2
    manifest = write_csv(tmp_path / "queries.csv", ["query", "positive"], rows)
    encoder = save_tiny_sentence_encoder(tmp_path / "encoder")
    ckpt = _fit(tmp_path, "st", encoder, "QueryDocData", manifest, {"method": "none"})
    out = tmp_path / "int8"
    run_cli("export", "--ckpt_path", ckpt, "--out", out, "--format", "onnx", "--quantize", "int8")
    assert not (out / "image_encoder.onnx").exists() and (out / "text_encoder.onnx").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["quantize"] == "int8" and report["files"] == {"text_encoder": "text_encoder.onnx"}
    sizes = report["file_bytes"]["text_encoder"]
    assert sizes["int8_bytes"] < sizes["fp32_bytes"]
    check = report["verification"]["text_encoder"]
    assert check["items"] >= 16 and check["mean_cosine"] >= 0.95  # queries and documents
    recall = report["retrieval_recall"]
    assert set(recall["trained"]) == set(recall["exported"]) == {"q2d_r@1", "d2q_r@1"}
    assert abs(recall["exported"]["q2d_r@1"] - recall["trained"]["q2d_r@1"]) <= 0.25
    text = json.loads((out / "preprocessing.json").read_text())["preprocessing"]["text_encoder"]
    assert text["pooling"].startswith("mean over tokens") and (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_text_encoder_lowers_to_executorch_with_dynamic_batch_and_length(tmp_path):
    """ExecuTorch (XNNPACK) lowers a BERT text tower; the runtime's embeddings equal the trained ones at
    other batch sizes (more than the 32 rows a call it is planned for) and lengths."""
    from mmtune import ImageTextAlignmentTask, ModelSpec
    from mmtune.errors import ExportError
    from mmtune.export.pipeline import ExportOptions
    from mmtune.export.source import ExportSource
    from mmtune.export.tower_export import PteTower, export_towers

    task = ImageTextAlignmentTask(ModelSpec(name=str(save_tiny_sentence_encoder(tmp_path / "encoder"))))
    task.setup("test")
    task.eval()
    source = ExportSource(task, "image_text_alignment", tmp_path / "x.ckpt", None)
    report = export_towers(source, tmp_path, ExportOptions(format="executorch"), None)
    assert report["files"] == {"text_encoder": "text_encoder.pte"}
    assert report["verification"]["text_encoder"]["max_abs_diff"] < 1e-3
    texts = [f"a photo of the {'big ' * (i % 5)}red square" for i in range(40)]
    enc = task.preprocess.text(texts)
    tower = PteTower(tmp_path / "text_encoder.pte", ("input_ids", "attention_mask"))
    with torch.no_grad():
        ours = task.embed_texts(enc).numpy()
    np.testing.assert_allclose(tower.run({k: v.numpy() for k, v in enc.items()}), ours, atol=1e-4)
    with pytest.raises(ExportError, match="int8 of image-text and text-embedding towers is ONNX only"):
        export_towers(source, tmp_path / "q", ExportOptions(format="executorch"), "int8")

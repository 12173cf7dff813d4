"""Per-sample records of the language tasks (SFT, DPO, vision-language): what `mmtune test` hands out
equals what the task logs, `mmtune test` reports intervals, and `mmtune evaluate --baseline` works
against the untuned base and against the model itself; the untuned base really is untuned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import only_version, run_cli
from mmtune.data.text import Collator, TextData
from mmtune.errors import ConfigError, DataError, ModelError
from mmtune.evaluation.baseline import build_baseline
from mmtune.evaluation.bootstrap import BootstrapSpec, align, compare
from mmtune.evaluation.scores import metrics_for
from mmtune.losses.tokens import token_loss, token_loss_per_row
from mmtune.metrics.records import RecordSet, SampleRecord, read_records
from mmtune.specs import AdapterSpec, ModelSpec
from mmtune.tasks.common import load_task
from mmtune.tasks.sft import CausalLMTask
from support.text import WORDS, build_model, repeat_rows, sft_config, write_jsonl
from support.tiny_vlms import make_images, tiny_vlm_dir

RESAMPLES = ("--evaluation.bootstrap.resamples", "100")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("lm"))


def _rows(n: int, seed: int) -> list[dict]:
    """Repeat-the-word rows of mixed answer lengths, with a metadata column."""
    rows = repeat_rows(n, seed=seed)
    for i, row in enumerate(rows):
        row["output"] = " ".join([row["input"]] * (1 + i % 4))
        row["category"] = "short" if i % 4 < 2 else "long"
    return rows


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft_data")
    return {"train": write_jsonl(root / "train.jsonl", _rows(32, 1)), "val": write_jsonl(root / "val.jsonl", _rows(6, 2)),
            "test": write_jsonl(root / "test.jsonl", _rows(9, 3))}


def _values(records: RecordSet) -> dict[str, float]:
    ones = np.ones((1, len(records)))
    return {m.name: float(m.fn(ones)[0]) for m in metrics_for(records)}


def _test_entry(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def _assert_records_give_logged_metrics(run: Path, names: list[str], tol: float = 1e-5) -> RecordSet:
    """records/test.jsonl gives every logged test metric (logged in float32: a relative 1e-6 too), and
    metrics.json has its interval."""
    entry = _test_entry(run)
    records = read_records(run / "records" / "test.jsonl")
    values = _values(records)
    for name in names:
        logged = entry["metrics"][f"test/{name}"]
        assert values[name] == pytest.approx(logged, rel=1e-6, abs=tol), name
        interval = entry["intervals"][name]
        assert interval["value"] == pytest.approx(logged, rel=1e-6, abs=tol), name
        assert interval["ci_low"] <= interval["value"] <= interval["ci_high"], name
    assert entry["samples"] == len(records)
    return records


def _assert_self_comparison_is_zero(run: Path, names: list[str]) -> dict:
    comparison = json.loads((run / "metrics.json").read_text())["evaluate"]["comparison"]
    for name in names:
        c = comparison[name]
        assert c["difference"] == 0.0 and c["ci_low"] <= 0.0 <= c["ci_high"], (name, c)
        assert c["verdict"] == "no clear difference"
    return comparison


def _independent_test_loss(task, dm: TextData) -> float:
    """The per-token test loss computed apart from the task's bookkeeping: whole batches, `token_loss`."""
    dm.setup("test")
    dm.connect(task.tokenizer)
    task.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = task.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            t, c = token_loss(logits, batch["labels"])
            total, count = total + float(t), count + int(c)
    return total / count


# ---- the per-sample loss helper -------------------------------------------------------------------------------
def test_per_row_loss_of_a_packed_batch_is_each_samples_own(tmp_path, llama):
    from mmtune.data.text import pack
    from mmtune.models.hf import load_causal_lm

    dm = TextData(path=str(write_jsonl(tmp_path / "rows.jsonl", _rows(10, 4))), split=(1.0, 0.0, 0.0), max_length=96)
    dm.setup("fit")
    dm.connect(CausalLMTask(ModelSpec(name=str(llama))).tokenizer)
    items = dm.tokenized["train"]
    model = load_causal_lm(ModelSpec(name=str(llama))).eval()
    bins = pack([len(x) for x in items], 96)
    assert len(bins) < len(items)  # several samples share rows
    packed = Collator(dm.tokenizer.pad_token_id, packed=True)([[items[i] for i in b] for b in bins])
    padded = Collator(dm.tokenizer.pad_token_id)([[x] for x in items])
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
    sums, counts = token_loss_per_row(packed_logits, packed["labels"], packed["row_ids"], len(packed["origins"]))
    total, count = token_loss(packed_logits, packed["labels"])
    assert float(sums.sum()) == pytest.approx(float(total), rel=1e-5) and int(counts.sum()) == int(count)
    # each sample's tokens, and its loss as the unpacked batch gives it (attention stays inside a sample)
    own_sums, own_counts = token_loss_per_row(padded_logits, padded["labels"], padded["row_ids"], len(items))
    by_origin = {o: (s, c) for o, s, c in zip(packed["origins"], sums.tolist(), counts.tolist())}
    assert sorted(by_origin) == sorted(padded["origins"]) and len(by_origin) == len(items)
    for origin, s, c in zip(padded["origins"], own_sums.tolist(), own_counts.tolist()):
        assert by_origin[origin][1] == c == sum(label != -100 for label in items[padded["origins"].index(origin)].labels[1:])
        assert by_origin[origin][0] == pytest.approx(s, rel=1e-4), origin
    assert packed["meta"][0]["category"] in {"short", "long"}


# ---- SFT ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
def test_sft_records_give_the_logged_test_loss_and_evaluate_compares(tmp_path, llama, text_files, packing, capsys):
    runs = tmp_path / "runs"
    cfg = sft_config(tmp_path / "sft.yaml", llama,
                     {"path": str(text_files["train"]), "val_path": str(text_files["val"]),
                      "test_path": str(text_files["test"]), "batch_size": 4, "max_length": 96, "packing": packing},
                     trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "sft")
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", *RESAMPLES)
    records = _assert_records_give_logged_metrics(run, ["loss", "perplexity"])
    assert records.kind == "language_model" and len(records) == 9
    assert len(set(records.ids)) == 9 and all(" line " in i for i in records.ids)  # file and line of each row
    assert {r.meta["category"] for r in records.records} == {"short", "long"}
    assert all(r.stats["tokens"] > 0 for r in records.records)
    tuned = load_task(str(run / "checkpoints" / "best.ckpt"))
    logged = _test_entry(run)["metrics"]["test/loss"]
    assert _independent_test_loss(tuned, TextData(test_path=str(text_files["test"]), path=str(text_files["train"]),
                                                  max_length=96, batch_size=3)) == pytest.approx(logged, abs=1e-5)
    if packing:
        return

    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--baseline", run / "checkpoints" / "best.ckpt", *RESAMPLES)
    _assert_self_comparison_is_zero(run, ["loss", "perplexity"])

    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", "base", *RESAMPLES)
    loss = json.loads((run / "metrics.json").read_text())["evaluate"]["comparison"]["loss"]
    base = CausalLMTask(ModelSpec(name=str(llama)), AdapterSpec(method="none"))
    base.configure_model()
    untuned = _independent_test_loss(base, TextData(path=str(text_files["train"]), test_path=str(text_files["test"]),
                                                    max_length=96))
    assert loss["baseline"] == pytest.approx(untuned, abs=1e-5)  # the plain model from its folder
    assert loss["tuned"] < loss["baseline"] and loss["ci_high"] < 0 and loss["verdict"] == "better"
    assert "better" in capsys.readouterr().out


@pytest.mark.slow
def test_sft_records_under_ddp_hold_each_sample_once_with_the_one_process_loss(tmp_path, llama, text_files):
    """Two CPU processes on 9 test rows: the distributed sampler repeats one row to even the shards;
    the records and the logged loss count it once, as one process does."""
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    cfg = sft_config(tmp_path / "sft.yaml", llama,
                     {"path": str(text_files["train"]), "val_path": str(text_files["val"]),
                      "test_path": str(text_files["test"]), "batch_size": 4, "max_length": 96},
                     trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "sft")
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", *RESAMPLES)
    one_loss = _test_entry(run)["metrics"]["test/loss"]
    one = {r.id: r for r in read_records(run / "records" / "test.jsonl").records}
    preset = Path(__file__).parent.parent / "configs" / "trainer" / "ddp.yaml"
    done = subprocess.run([sys.executable, "-m", "mmtune", "test", "--config", str(preset), "--config", str(cfg),
                           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                           "--runs_dir", str(runs), "--ckpt_path", "best", *RESAMPLES],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    records = read_records(run / "records" / "test.jsonl")
    assert sorted(records.ids) == sorted(one) and len(records) == 9
    for r in records.records:
        assert r.stats["tokens"] == one[r.id].stats["tokens"]
        assert r.stats["loss_sum"] == pytest.approx(one[r.id].stats["loss_sum"], rel=1e-5)
    assert _test_entry(run)["metrics"]["test/loss"] == pytest.approx(one_loss, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("method", ["none", "lora", "dora", "ia3", "loha", "lokr"])
def test_base_baseline_is_the_untuned_model(llama, method):
    from mmtune.models.hf import load_causal_lm

    tuned = CausalLMTask(ModelSpec(name=str(llama)), AdapterSpec(method=method, r=4))
    base = build_baseline(tuned, "base")
    assert base is not tuned and type(base) is CausalLMTask
    base.configure_model()
    plain = load_causal_lm(ModelSpec(name=str(llama))).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 120]])
    base.eval()
    with torch.no_grad():
        assert torch.allclose(base({"input_ids": ids}), plain(input_ids=ids).logits, atol=1e-6), method


def test_base_is_refused_for_random_weights_and_exports_of_other_tasks(tmp_path, llama):
    with pytest.raises(ConfigError, match="random weights"):
        build_baseline(CausalLMTask(ModelSpec(name=str(llama), pretrained=False)), "base")
    other = tmp_path / "vlm_export"
    other.mkdir()
    (other / "mmtune.json").write_text(json.dumps({"task": "vision_language"}))
    with pytest.raises(ModelError, match="vision_language"):
        build_baseline(CausalLMTask(ModelSpec(name=str(llama))), str(other))


def _lm_records(tokens: list[int], vocabulary: str = "v1", kind: str = "language_model", **extra) -> RecordSet:
    return RecordSet(kind, [SampleRecord(id=str(i), stats={"loss_sum": 2.0 * t, "tokens": t}, **extra)
                            for i, t in enumerate(tokens)], {"vocabulary": vocabulary})


def test_baselines_with_other_tokens_are_refused_or_lose_only_the_loss(caplog):
    with pytest.raises(DataError, match="another vocabulary"):
        align(_lm_records([3, 4, 5]), _lm_records([3, 4, 5], vocabulary="v2"))
    with pytest.raises(DataError, match="sample 1: 6 tokens against 4"):
        align(_lm_records([3, 4, 5]), _lm_records([3, 6, 5]))
    # generated text still compares when the loss does not
    tuned = _lm_records([3, 4, 5], kind="generation", prediction="a red square", target="a red square")
    other = _lm_records([3, 6, 5], kind="generation", prediction="a red circle", target="a red square")
    result = compare(tuned, other, BootstrapSpec(resamples=20))
    assert "bleu4" in result and "loss" not in result and "perplexity" not in result
    assert "left out of the comparison" in caplog.text


# ---- DPO ------------------------------------------------------------------------------------------------------------
def _pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, other = rng.sample(WORDS, 2)
        rows.append({"prompt": f"Repeat: {w}", "chosen": f"{w} {w}", "rejected": other, "source": f"s{i % 2}"})
    return rows


def test_dpo_records_give_the_logged_metrics_and_evaluate_compares(tmp_path, llama, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(16, 0))
    test = write_jsonl(tmp_path / "test.jsonl", _pairs(7, 1))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "DPOTask", "init_args": {
            "model": {"name": str(llama)}, "adapter": {"method": "lora", "r": 4},
            "optimizer": {"lr": 0.01, "warmup": 0}, "preference": {"beta": 0.2}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(test),
                                                              "test_path": str(test), "max_length": 64,
                                                              "batch_size": 4}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }))
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "dpo")
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", *RESAMPLES)
    records = _assert_records_give_logged_metrics(run, ["loss", "reward_margin", "accuracy"])
    assert records.kind == "preference" and len(records) == 7 and len(set(records.ids)) == 7
    assert {r.stats["accuracy"] for r in records.records} <= {0.0, 1.0}
    assert all((r.stats["accuracy"] == 1.0) == (r.stats["reward_margin"] > 0) for r in records.records)
    assert {r.meta["source"] for r in records.records} == {"s0", "s1"}

    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--baseline", run / "checkpoints" / "best.ckpt", *RESAMPLES)
    _assert_self_comparison_is_zero(run, ["loss", "reward_margin", "accuracy"])
    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", "base", *RESAMPLES)
    comparison = json.loads((run / "metrics.json").read_text())["evaluate"]["comparison"]
    # the untuned policy is its own reference: no reward either way, the loss of a coin
    assert comparison["reward_margin"]["baseline"] == 0.0 and comparison["accuracy"]["baseline"] == 0.0
    assert comparison["loss"]["baseline"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(SystemExit):
        run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", tmp_path)
    assert "its own reference" in capsys.readouterr().err


# ---- vision-language ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlms")


def _vqa_file(root: Path) -> Path:
    images = make_images(16, root / "images")
    rows = []
    for i, path in enumerate(images):
        color, shape = path.stem.split("_")[1:]
        closed = i % 2 == 0
        rows.append({"id": f"q{i}", "image": str(path), "question": f"Is it {color}?" if closed else "What shape is it?",
                     "answer": ["yes", "Yes."] if closed else shape, "answer_type": "closed" if closed else "open",
                     "site": f"site{i % 3}", "split": "train" if i < 8 else "val" if i < 10 else "test"})
    path = root / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vlm_config(path: Path, model_dir: Path, data_path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "VisionLanguageTask", "init_args": {
            "model": {"name": str(model_dir)}, "adapter": {"method": "lora", "r": 8, "alpha": 16},
            "optimizer": {"lr": 5e-3, "weight_decay": 0.0, "warmup": 0}, "decoding": {"max_new_tokens": 4},
            "monitor": {"early_stopping": False}}},
        "data": {"class_path": "VisionTextData", "init_args": {"path": str(data_path), "batch_size": 4, "num_workers": 0,
                                                              **data}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }))
    return path


VQA_METRICS = ["loss", "perplexity", "bleu4", "rougeL", "chrf", "vqa_acc", "vqa_acc_closed", "vqa_acc_open"]


def test_vqa_records_give_the_logged_metrics_and_evaluate_compares(tmp_path, vlm_root):
    cfg = _vlm_config(tmp_path / "vqa.yaml", tiny_vlm_dir("qwen2_vl", vlm_root), _vqa_file(tmp_path))
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "vqa")
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", *RESAMPLES)
    records = _assert_records_give_logged_metrics(run, VQA_METRICS)
    assert records.kind == "generation" and records.info["vqa"] is True
    assert sorted(records.ids) == [f"q{i}" for i in range(10, 16)]
    first = next(r for r in records.records if r.id == "q10")
    assert first.target == "yes" and first.meta["answers"] == ["yes", "Yes."] and first.meta["answer_type"] == "closed"
    assert first.meta["site"] == "site1" and isinstance(first.prediction, str) and first.stats["tokens"] > 0

    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--baseline", run / "checkpoints" / "best.ckpt", *RESAMPLES)
    _assert_self_comparison_is_zero(run, VQA_METRICS)
    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", "base", *RESAMPLES)
    comparison = json.loads((run / "metrics.json").read_text())["evaluate"]["comparison"]
    assert set(VQA_METRICS) <= set(comparison)
    assert comparison["loss"]["baseline"] > comparison["loss"]["tuned"]


def test_vlm_base_baseline_is_the_untuned_model(tmp_path, vlm_root):
    from mmtune.data.vl_data import VisionTextData, VisualCollate
    from mmtune.models.vlm import load_vlm
    from mmtune.tasks.vlm import VisionLanguageTask

    model = {"name": str(tiny_vlm_dir("llava", vlm_root))}
    tuned = VisionLanguageTask(model=model, adapter={"method": "lora", "r": 4, "parts": {"vision": "adapter"}})
    base = build_baseline(tuned, "base")
    base.configure_model()
    dm = VisionTextData(path=str(_vqa_file(tmp_path)), batch_size=4, num_workers=0)
    dm.setup("test")
    dm.connect(base.encoding)
    dataset = dm._dataset("test")
    batch = VisualCollate(dm.encoding, dm.max_length, with_prompts=False)([dataset[i] for i in range(3)])
    plain = load_vlm(ModelSpec(**model)).eval()
    base.eval()
    with torch.no_grad():
        got = base.net(**base._inputs(batch["inputs"]), use_cache=False).logits
        expected = plain(**batch["inputs"], use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_caption_records_say_not_vqa_and_repeated_ids_are_told_apart(tmp_path, vlm_root):
    import lightning as L

    from mmtune.data.vl_data import VisionTextData
    from mmtune.tasks.vlm import VisionLanguageTask

    images = make_images(6, tmp_path / "images")
    rows = [{"id": p.stem, "image": str(p), "text": "a picture", "split": "train"} for p in images[:4]]
    # two captions of each test image under the image's id
    rows += [{"id": p.stem, "image": str(p), "text": f"a picture, take {k}", "split": "test"}
             for p in images[4:] for k in range(2)]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = VisionLanguageTask(model={"name": str(tiny_vlm_dir("qwen2_vl", vlm_root))}, adapter={"method": "lora", "r": 4},
                              decoding={"max_new_tokens": 3})
    dm = VisionTextData(path=str(path), batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    logged = trainer.test(task, datamodule=dm, verbose=False)[0]
    records = task.records["test"]
    assert records.info["vqa"] is False and "test/vqa_acc" not in logged
    values = _values(records)
    assert "vqa_acc" not in values
    for name in ("loss", "bleu4", "rougeL", "chrf"):
        assert values[name] == pytest.approx(logged[f"test/{name}"], abs=1e-5), name
    a, b = images[4].stem, images[5].stem
    assert sorted(records.ids) == sorted([a, a + "#2", b, b + "#2"])
    assert {r.id: r.target for r in records.records}[a + "#2"] == "a picture, take 1"

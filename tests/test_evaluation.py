"""Evaluation: per-sample records, metrics as functions of weights, bootstrap intervals, paired
comparisons, and `mmtune test` / `mmtune evaluate` through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import only_version, run_cli, write_config
from mmtune.errors import ConfigError, DataError
from mmtune.evaluation import text_stats
from mmtune.evaluation.bootstrap import BootstrapSpec, compare, intervals, resample_weights
from mmtune.evaluation.scores import metrics_for
from mmtune.metrics.classification import ClassificationMetrics
from mmtune.metrics.ranking import class_log_odds, weighted_auroc, weighted_average_precision
from mmtune.metrics.records import RecordSet, SampleRecord, read_records, write_records


def _classification_records(logits, targets, multi_label=False, classes=("a", "b", "c"), thresholds=0.5):
    logits = np.asarray(logits, dtype=np.float64)
    records = []
    for i, (z, t) in enumerate(zip(logits, targets)):
        if multi_label:
            pred = [c for c in range(len(classes)) if 1 / (1 + np.exp(-z[c])) >= thresholds]
            target = [c for c in range(len(classes)) if t[c]]
        else:
            pred, target = [int(np.argmax(z))], [int(t)]
        records.append(SampleRecord(id=f"row {i}", target=target, prediction=pred, scores=z.tolist(),
                                    meta={"site": "A" if i % 2 else "B"}))
    return RecordSet("classification", records, {"classes": list(classes), "multi_label": multi_label,
                                                 "thresholds": [thresholds] * len(classes)})


def _values(records):
    ones = np.ones((1, len(records)))
    return {m.name: float(m.fn(ones)[0]) for m in metrics_for(records)}


# ---- ranking from logits ---------------------------------------------------------------------------
def test_weighted_ranking_matches_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    positive = rng.random(300) < 0.3
    weights = rng.integers(0, 3, 300).astype(float)
    assert weighted_auroc(scores, positive)[0] == pytest.approx(roc_auc_score(positive, scores))
    assert weighted_auroc(scores, positive, weights)[0] == pytest.approx(roc_auc_score(positive, scores, sample_weight=weights))
    assert weighted_average_precision(scores, positive, weights)[0] == pytest.approx(
        average_precision_score(positive, scores, sample_weight=weights))


def test_binary_auroc_equal_for_both_classes_when_softmax_saturates():
    """float32 softmax gives exactly 1.0 for margins past ~17; ranking must not see those ties."""
    rng = np.random.default_rng(1)
    target = rng.integers(0, 2, 400)
    margin = rng.normal(0, 1, 400) + np.where(target == 1, 25.0, 20.0)  # almost all saturate in float32
    logits = torch.tensor(np.stack([np.zeros(400), margin], axis=1), dtype=torch.float32)
    assert (logits.softmax(-1)[:, 1] == 1.0).float().mean() > 0.9
    metrics = ClassificationMetrics(2, multi_label=False)
    metrics.update(logits, torch.tensor(target))
    auroc = metrics.compute()["auroc"]
    assert auroc[0].item() == pytest.approx(auroc[1].item(), abs=1e-7)
    assert auroc[1].item() > 0.99  # the margins do separate the classes
    odds = class_log_odds(logits.numpy(), multi_label=False)
    np.testing.assert_allclose(odds[:, 0], -odds[:, 1])


# ---- metric definitions against torchmetrics --------------------------------------------------------
@pytest.mark.parametrize("multi_label", [False, True])
def test_record_metrics_equal_task_metrics(multi_label):
    rng = np.random.default_rng(2)
    n, k = 120, 3
    logits = rng.normal(0, 2, (n, k))
    targets = (rng.random((n, k)) < 0.4) if multi_label else rng.integers(0, k, n)
    logits[np.arange(n), 0] += (targets[:, 0] if multi_label else targets == 0) * 1.5
    records = _classification_records(logits, targets, multi_label)
    task_metrics = ClassificationMetrics(k, multi_label, 0.5)
    task_metrics.update(torch.tensor(logits, dtype=torch.float32), torch.tensor(np.asarray(targets, dtype=np.int64)))
    logged = task_metrics.compute()
    values = _values(records)
    assert values["accuracy"] == pytest.approx(logged["accuracy"].item(), abs=1e-6)
    assert values["f1_macro"] == pytest.approx(logged["f1_macro"].item(), abs=1e-6)
    assert values["auroc_macro"] == pytest.approx(logged["auroc_macro"].item(), abs=1e-6)
    for c, name in enumerate("abc"):
        assert values[f"sensitivity/{name}"] == pytest.approx(logged["sensitivity"][c].item(), abs=1e-6)
        assert values[f"specificity/{name}"] == pytest.approx(logged["specificity"][c].item(), abs=1e-6)


def test_text_statistics_give_torchmetrics_corpus_scores():
    from torchmetrics.text import BLEUScore, CHRFScore
    from torchmetrics.text.rouge import ROUGEScore

    preds = ["the heart is normal in size", "no acute findings", "small left effusion", "lungs are clear",
             "mild cardiomegaly"]
    refs = ["the heart is normal in size .", "no acute cardiopulmonary findings", "small right effusion",
            "the lungs are clear", "cardiomegaly"]
    records = RecordSet("generation", [SampleRecord(id=str(i), target=r, prediction=p) for i, (p, r) in
                                       enumerate(zip(preds, refs))])
    values = _values(records)
    assert values["bleu4"] == pytest.approx(float(BLEUScore(n_gram=4, smooth=True)(preds, [[r] for r in refs])), abs=1e-6)
    assert values["chrf"] == pytest.approx(float(CHRFScore()(preds, [[r] for r in refs])), abs=1e-6)
    assert values["rougeL"] == pytest.approx(float(ROUGEScore(rouge_keys=("rougeL",))(preds, refs)["rougeL_fmeasure"]),
                                             abs=1e-6)
    stats = np.stack([text_stats.bleu_stats(p, r) for p, r in zip(preds, refs)])
    assert text_stats.bleu_from_stats(stats.sum(0))[0] == pytest.approx(values["bleu4"])


# ---- bootstrap ----------------------------------------------------------------------------------------
def _noisy_classifier(seed, n=200, skill=2.0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), target] += skill
    return logits, target


def test_model_compared_with_itself_differs_by_zero():
    logits, target = _noisy_classifier(3)
    records = _classification_records(logits, target)
    result = compare(records, records, BootstrapSpec(resamples=200, seed=1))
    for name in ("accuracy", "f1_macro", "auroc_macro", "ece"):
        c = result[name]
        assert c.difference == 0.0 and c.ci_low <= 0.0 <= c.ci_high, name
        assert c.verdict == "no clear difference"


def test_model_made_worse_gives_interval_excluding_zero():
    logits, target = _noisy_classifier(4)
    tuned = _classification_records(logits, target)
    rng = np.random.default_rng(5)
    worse_logits = logits.copy()
    flip = rng.random(len(target)) < 0.35  # a third of the samples now get a wrong top class
    worse_logits[flip] = np.roll(worse_logits[flip], 1, axis=1)
    baseline = _classification_records(worse_logits, target)
    result = compare(tuned, baseline, BootstrapSpec(resamples=300, seed=0))
    acc = result["accuracy"]
    assert acc.difference > 0 and acc.ci_low > 0, acc
    assert acc.verdict == "better"
    assert result["auroc_macro"].ci_low > 0


def test_intervals_are_seeded_and_cover_the_value():
    logits, target = _noisy_classifier(6)
    records = _classification_records(logits, target)
    a = intervals(records, BootstrapSpec(resamples=200, seed=7))
    b = intervals(records, BootstrapSpec(resamples=200, seed=7))
    assert a == b
    for name in ("accuracy", "auroc_macro", "sensitivity/b"):
        assert a[name].ci_low <= a[name].value <= a[name].ci_high, name
        assert a[name].ci_low < a[name].ci_high
    c = intervals(records, BootstrapSpec(resamples=200, seed=8))
    assert c["accuracy"].ci_low != a["accuracy"].ci_low or c["accuracy"].ci_high != a["accuracy"].ci_high


def test_bootstrap_refuses_a_single_sample_and_mismatched_models():
    logits, target = _noisy_classifier(0, n=1)
    with pytest.raises(DataError, match="at least 2 test samples"):
        intervals(_classification_records(logits, target), BootstrapSpec(resamples=10))
    logits, target = _noisy_classifier(0, n=20)
    other = _classification_records(logits, target, classes=("x", "y", "z"))
    with pytest.raises(DataError, match="other classes"):
        compare(_classification_records(logits, target), other)
    fewer = _classification_records(logits[:10], target[:10])
    with pytest.raises(DataError, match="other samples"):
        compare(_classification_records(logits, target), fewer)


def test_stratified_resamples_keep_each_stratum_size():
    strata = ["i2t"] * 5 + ["t2i"] * 15
    for w in resample_weights(20, BootstrapSpec(resamples=50), strata):
        assert (w[:, :5].sum(axis=1) == 5).all() and (w[:, 5:].sum(axis=1) == 15).all()


def test_records_round_trip(tmp_path):
    logits, target = _noisy_classifier(0, n=5)
    records = _classification_records(logits, target)
    records.records[0].stats["nan"] = float("nan")
    path = write_records(tmp_path / "records" / "test.jsonl", records)
    back = read_records(path)
    assert back.kind == "classification" and back.info == records.info and len(back) == 5
    assert back.records[1] == records.records[1]
    assert back.records[0].stats["nan"] is None  # JSON has no NaN
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n")  # cut the last record
    with pytest.raises(DataError, match="cut short"):
        read_records(path)


# ---- through the CLI --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_models, color_set):
    root = tmp_path_factory.mktemp("evaluate")
    runs = root / "runs"
    cfg = write_config(root / "colors.yaml", tiny_models["cnn"], color_set,
                       model_args={"adapter": {"method": "none"}}, trainer={"max_epochs": 2})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    return cfg, runs, only_version(runs, "colors")


def test_test_writes_records_and_intervals(fitted, capsys):
    cfg, runs, run = fitted
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best",
            "--evaluation.bootstrap.resamples", "200")
    summary = json.loads((run / "metrics.json").read_text())["test"]
    records = read_records(run / "records" / "test.jsonl")
    assert summary["samples"] == len(records) > 2
    assert sum(summary["class_counts"].values()) == len(records)
    assert set(summary["class_counts"]) == {"blue", "green", "red"}
    acc = summary["intervals"]["accuracy"]
    assert acc["value"] == pytest.approx(summary["metrics"]["test/accuracy"], abs=1e-6)
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert summary["bootstrap"]["resamples"] == 200
    assert records.records[0].meta["group"].startswith("g")  # the manifest's columns travel with the records
    assert "95% CI" in capsys.readouterr().out
    assert summary["wall_time_s"] > 0 and summary["ckpt_path"].endswith("best.ckpt")


def test_metrics_json_names_the_best_checkpoint_and_wall_times(fitted):
    cfg, runs, run = fitted
    fit = json.loads((run / "metrics.json").read_text())["fit"]
    best = torch.load(fit["best_model_path"], map_location="cpu", weights_only=True)
    assert (fit["best_epoch"], fit["best_step"]) == (best["epoch"], best["global_step"])
    assert fit["wall_time_s"] > 0 and "interrupted" not in fit


def test_confusion_matrix_names_split_and_checkpoint_with_a_normalised_view(fitted):
    import csv

    cfg, runs, run = fitted
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--evaluation.bootstrap.resamples", "20")
    counts = list(csv.reader((run / "confusion_matrix.csv").open()))[1:]
    shares = list(csv.reader((run / "confusion_matrix_normalized.csv").open()))[1:]
    for count_row, share_row in zip(counts, shares):
        n = sum(int(v) for v in count_row[1:])
        assert [float(v) for v in share_row[1:]] == pytest.approx([int(v) / n for v in count_row[1:]], abs=1e-4)


def test_an_interrupted_fit_still_writes_its_fit_entry(tmp_path, tiny_models, color_set):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mmtune import ImageClassificationData, ImageClassificationTask, ModelSpec

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("node lost")

    task = ImageClassificationTask(model=ModelSpec(name=str(tiny_models["cnn"])))
    data = ImageClassificationData(path=str(color_set), batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=CSVLogger(tmp_path, name="run", version=0),
                        callbacks=[Crash()], enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.fit(task, datamodule=data)
    fit = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())["fit"]
    assert fit["interrupted"] is True and "node lost" in fit["error"] and fit["global_step"] == 3


def test_evaluate_against_itself_and_refuses_base_for_a_classifier(fitted, capsys):
    cfg, runs, run = fitted
    best = run / "checkpoints" / "best.ckpt"
    run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", best,
            "--evaluation.bootstrap.resamples", "100")
    entry = json.loads((run / "metrics.json").read_text())["evaluate"]
    assert entry["baseline"] == str(best)
    acc = entry["comparison"]["accuracy"]
    assert acc["difference"] == 0.0 and acc["ci_low"] <= 0.0 <= acc["ci_high"]
    assert (run / "evaluation" / "baseline.jsonl").is_file() and (run / "evaluation" / "comparison.json").is_file()
    assert "no clear difference" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli("evaluate", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--baseline", "base")
    assert "no untuned model" in capsys.readouterr().err


def test_base_baseline_error_is_a_config_error(fitted):
    from mmtune.evaluation.baseline import build_baseline
    from mmtune.tasks.common import load_task

    cfg, runs, run = fitted
    with pytest.raises(ConfigError, match="no untuned model"):
        build_baseline(load_task(str(run / "checkpoints" / "best.ckpt")), "base")


def test_export_writes_a_model_card_that_round_trips(fitted, tmp_path):
    from huggingface_hub import ModelCard

    cfg, runs, run = fitted
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--evaluation.bootstrap.resamples", "50")
    out = tmp_path / "exported"
    run_cli("export", "--ckpt_path", run / "checkpoints" / "best.ckpt", "--out", out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.base_model.endswith("cnn")
    assert card.data.pipeline_tag == "image-classification" and "mmtune" in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert results["accuracy"] == pytest.approx(test["intervals"]["accuracy"]["value"], abs=1e-6)
    for heading in ("## Training data", "## Training procedure", "## Evaluation", "## Known limitations"):
        assert heading in card.text, heading
    assert "No subgroup audit was run" in card.text
    again = ModelCard(str(card))
    assert again.data.to_dict() == card.data.to_dict()

"""Calibration and operating points: temperature scaling, calibration error and reliability bins,
thresholds for sensitivity/specificity targets, best F1 and Youden's J, and their way through fit,
test, predict and export."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from conftest import only_version, run_cli, write_config, write_csv
from mmtune.errors import ConfigError
from mmtune.evaluation import calibration as cal
from mmtune.evaluation.scores import metrics_for, probabilities
from mmtune.metrics.classification import ClassificationMetrics
from mmtune.metrics.records import RecordSet, SampleRecord, read_records


def _overconfident(seed: int, n: int, k: int, multi_label: bool, scale: float = 5.0):
    """A noisy problem whose true log-odds are `z` (labels drawn from them, so T = 1 is calibrated for
    `z`), and the logits of a model that reports `scale * z`: over-confident by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.0, (n, k))
    if multi_label:
        y = rng.random((n, k)) < 1 / (1 + np.exp(-z))
    else:
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        y = np.array([rng.choice(k, p=row) for row in p])
    return scale * z, y


@pytest.mark.parametrize("multi_label", [False, True])
def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model(multi_label):
    logits, y = _overconfident(0, 2000, 3, multi_label)
    val, held_out = slice(0, 1000), slice(1000, None)
    t = cal.fit_temperature(logits[val], y[val], multi_label)
    assert 3.5 < t < 7.0  # near the 5 the logits were scaled by
    for part in (val, held_out):
        before = cal.expected_calibration_error(probabilities(logits[part], multi_label), y[part], multi_label)
        after = cal.expected_calibration_error(probabilities(logits[part], multi_label, t), y[part], multi_label)
        assert after < before / 2, (before, after)
    # The fit minimises the NLL: nearby temperatures do worse on the data it was fitted on.
    nll = lambda t_: float(torch.nn.functional.cross_entropy(torch.tensor(logits[val] / t_), torch.tensor(y[val])))  # noqa: E731
    if not multi_label:
        assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1))


def test_temperature_fits_inside_inference_mode_as_at_validation_epoch_end():
    logits, y = _overconfident(1, 400, 3, False)
    with torch.inference_mode():
        t = cal.fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(y), False)
    assert t > 2


@pytest.mark.parametrize("multi_label", [False, True])
def test_reliability_bins_add_up_to_the_calibration_error(multi_label):
    logits, y = _overconfident(2, 300, 4, multi_label, scale=2.0)
    probs = probabilities(logits, multi_label)
    bins = cal.reliability_bins(probs, y, multi_label)
    total = sum(b["count"] for b in bins)
    assert total == (probs.size if multi_label else len(probs))
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total
    assert ece == pytest.approx(cal.expected_calibration_error(probs, y, multi_label), abs=1e-12)
    assert all(b["lower"] <= b["confidence"] <= b["upper"] for b in bins if b["count"])


def _scores(seed=3, n=157, k=3):
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < 0.35
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, (n, k)) + 1.2 * y)))
    s[:5] = s[5:10]  # some ties
    return s, y


def _rates(s, y, t):
    at = s >= t
    return (at & y).sum() / y.sum(), (~at & ~y).sum() / (~y).sum(), 2 * (at & y).sum() / (at.sum() + y.sum())


def _brute_force(s, y):
    """Every distinct decision on one class's scores: thresholds at each score and above all."""
    return [_rates(s, y, t) for t in [*np.unique(s), 2.0]]


@pytest.mark.parametrize("target", [0.95, 0.8, 0.5])
def test_sensitivity_threshold_reaches_the_target_and_is_the_highest_that_does(target):
    s, y = _scores()
    choice = cal.choose_thresholds(s, y, {"sensitivity": target})
    for c in range(s.shape[1]):
        sens, spec, _ = _rates(s[:, c], y[:, c], choice.thresholds[c])
        assert sens >= target
        assert (sens, spec) == pytest.approx((choice.sensitivity[c], choice.specificity[c]))
        # No decision with higher specificity still reaches the target sensitivity.
        best_spec = max(sp for se, sp, _ in _brute_force(s[:, c], y[:, c]) if se >= target)
        assert spec == pytest.approx(best_spec)


@pytest.mark.parametrize("target", [0.95, 0.9])
def test_specificity_threshold_reaches_the_target_and_is_the_lowest_that_does(target):
    s, y = _scores(seed=4)
    choice = cal.choose_thresholds(s, y, {"specificity": target})
    for c in range(s.shape[1]):
        sens, spec, _ = _rates(s[:, c], y[:, c], choice.thresholds[c])
        assert spec >= target
        best_sens = max(se for se, sp, _ in _brute_force(s[:, c], y[:, c]) if sp >= target)
        assert sens == pytest.approx(best_sens)


def test_max_f1_and_youden_equal_a_brute_force_search():
    s, y = _scores(seed=5)
    f1_choice = cal.choose_thresholds(s, y, "max_f1")
    j_choice = cal.choose_thresholds(s, y, {"rule": "youden"})
    for c in range(s.shape[1]):
        grid = _brute_force(s[:, c], y[:, c])
        assert _rates(s[:, c], y[:, c], f1_choice.thresholds[c])[2] == pytest.approx(max(f1 for *_, f1 in grid))
        se, sp, _ = _rates(s[:, c], y[:, c], j_choice.thresholds[c])
        assert se + sp - 1 == pytest.approx(max(a + b - 1 for a, b, _ in grid))


def test_thresholds_hold_when_probabilities_are_recomputed_in_float32():
    s, y = _scores(seed=6, n=500)
    choice = cal.choose_thresholds(s, y, {"sensitivity": 0.95})
    s32, t32 = torch.tensor(s, dtype=torch.float32), torch.tensor(choice.thresholds, dtype=torch.float32)
    assert ((s32 >= t32).numpy() == (s >= choice.thresholds)).all()


def test_a_class_without_positives_keeps_its_default_threshold():
    s, y = _scores(seed=7)
    y[:, 1] = False
    choice = cal.choose_thresholds(s, y, {"sensitivity": 0.9}, default=[0.5, 0.3, 0.5])
    assert choice.undefined == [1] and choice.thresholds[1] == 0.3 and np.isnan(choice.sensitivity[1])


def test_binary_operating_point_thresholds_the_positive_class():
    logits, y = _overconfident(8, 400, 2, False)
    fitted = cal.calibrate(logits, y, ["normal", "pneumonia"], False, True,
                           cal.parse_operating_point({"sensitivity": 0.95}), [0.5, 0.5])
    assert fitted.temperature > 2 and fitted.ece_after < fitted.ece_before
    assert list(fitted.thresholds) == ["pneumonia"] and fitted.val_sensitivity["pneumonia"] >= 0.95
    metrics = ClassificationMetrics(2, False, [0.5, fitted.thresholds["pneumonia"]], positive=1)
    predicted = metrics.predict(torch.tensor(logits / fitted.temperature, dtype=torch.float32)).numpy()
    assert ((predicted == 1) & (y == 1)).sum() / (y == 1).sum() >= 0.95
    assert (predicted == 1).sum() > (logits.argmax(1) == 1).sum()  # more positives than argmax gives


def test_perfectly_separated_validation_keeps_temperature_one(caplog):
    logits = np.array([[3.0, -1.0], [-2.0, 2.5], [1.0, 0.0], [0.0, 4.0]])
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        assert cal.fit_temperature(logits, np.array([0, 1, 0, 1]), False) == 1.0
        assert cal.fit_temperature(logits, logits > 0, True) == 1.0
    assert "separated without an error" in caplog.text
    assert cal.fit_temperature(logits, np.array([0, 1, 1, 1]), False) != 1.0  # one error: a finite fit


def test_calibration_with_too_few_validation_samples_keeps_temperature_one(caplog):
    logits, y = _overconfident(9, 5, 3, False)
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        fitted = cal.calibrate(logits, y, ["a", "b", "c"], False, True, None, [0.5] * 3)
    assert fitted.temperature == 1.0 and "fewer than 2 per class" in caplog.text


@pytest.mark.parametrize("value,message", [
    ({"sensitivity": 1.5}, "(0, 1]"), ({"specificity": 0}, "(0, 1]"), ({"sensitivity": True}, "(0, 1]"),
    ("best_f1", "unknown rule 'best_f1'"), ({"sensitivity": 0.9, "fpr": 0.1}, "unknown key(s) ['fpr']"),
    ({"max_f1": 0.5}, "takes no target"), (["youden"], "expected a rule name"),
])
def test_bad_operating_points_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=None) as err:
        cal.parse_operating_point(value)
    assert message in str(err.value)


def test_operating_point_is_refused_for_more_than_two_exclusive_classes():
    point = cal.parse_operating_point("youden")
    with pytest.raises(ConfigError, match="3 exclusive classes"):
        cal.positive_index(point, ["a", "b", "c"], multi_label=False)
    with pytest.raises(ConfigError, match="not a class"):
        cal.positive_index(cal.parse_operating_point({"rule": "youden", "positive": "x"}), ["a", "b"], False)
    assert cal.positive_index(point, ["a", "b", "c"], multi_label=True) is None
    assert cal.positive_index(cal.parse_operating_point({"sensitivity": 0.9, "positive": "a"}), ["a", "b"], False) == 0


def test_records_with_a_temperature_report_the_error_before_it_too():
    logits, y = _overconfident(10, 300, 3, False)
    t = cal.fit_temperature(logits, y, False)
    records = RecordSet("classification", [SampleRecord(str(i), [int(c)], [int(z.argmax())], z.tolist())
                                            for i, (z, c) in enumerate(zip(logits, y))],
                        {"classes": ["a", "b", "c"], "multi_label": False, "temperature": t})
    values = {m.name: float(m.fn(np.ones((1, len(records))))[0]) for m in metrics_for(records)}
    assert values["ece"] < values["ece_uncalibrated"]
    assert values["ece_uncalibrated"] == pytest.approx(cal.expected_calibration_error(probabilities(logits, False), y, False))


# ---- through the CLI --------------------------------------------------------------------------------
CLASSES = ("blue", "green", "red")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_calibrated_multilabel_run_saves_and_applies_temperature_and_thresholds(tmp_path, tiny_models, multilabel_set):
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "cal.yaml", tiny_models["vit"], multilabel_set,
                       model_args={"adapter": {"method": "lora", "r": 4}, "calibration": "temperature",
                                   "operating_point": {"sensitivity": 0.9}},
                       data_args={"group_column": "patient"}, trainer={"max_epochs": 2})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "cal")
    best = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=False)
    assert ckpt["mmtune_weights"] == "trainable"  # a LoRA checkpoint keeps them too
    saved = ckpt["mmtune_calibration"]
    assert saved["temperature"] == pytest.approx(float(ckpt["state_dict"]["temperature"]))
    assert [saved["thresholds"][c] for c in CLASSES] == pytest.approx(ckpt["state_dict"]["decision_thresholds"].tolist())
    assert all(v is None or v >= 0.9 for v in saved["val_sensitivity"].values())
    entry = json.loads((run / "metrics.json").read_text())["calibration"]
    assert entry["fitted_on"] == "val" and entry["checkpoint"] == str(best)
    assert entry["thresholds"] == saved["thresholds"] and entry["operating_point"]["rule"] == "sensitivity"
    assert {"val/ece", "val/ece_calibrated", "val/temperature"} <= set(_read_csv(run / "metrics.csv")[0])

    # Test, predict and export use what the checkpoint holds: edited values make that visible.
    t, thresholds = 3.0, [0.7, 0.75, 0.8]
    ckpt["state_dict"]["temperature"] = torch.tensor(t)
    ckpt["state_dict"]["decision_thresholds"] = torch.tensor(thresholds)
    ckpt["mmtune_calibration"] = {**saved, "temperature": t, "thresholds": dict(zip(CLASSES, thresholds))}
    edited = run / "checkpoints" / "edited.ckpt"
    torch.save(ckpt, edited)

    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", edited, "--evaluation.bootstrap.resamples", "50")
    records = read_records(run / "records" / "test.jsonl")
    assert records.info["temperature"] == t and records.info["thresholds"] == pytest.approx(thresholds)
    assert records.info["operating_point"] == {"rule": "sensitivity", "target": 0.9, "positive_class": None}
    uncalibrated = [[c for c in range(3) if _sigmoid(r.scores[c]) >= 0.5] for r in records.records]
    assert [r.prediction for r in records.records] != uncalibrated  # else this test could not tell
    for r in records.records:  # test decisions: calibrated probabilities against the saved thresholds
        assert r.prediction == [c for c in range(3) if _sigmoid(r.scores[c] / t) >= thresholds[c]]
    summary = json.loads((run / "metrics.json").read_text())
    assert {"ece", "ece_uncalibrated", "sensitivity/red"} <= set(summary["test"]["intervals"])
    entry = summary["calibration"]
    assert entry["temperature"] == t and entry["checkpoint"] == str(edited)
    assert entry["test"]["samples"] == len(records) and len(entry["test"]["reliability_after"]) == 15
    assert entry["test"]["ece_after"] == pytest.approx(summary["test"]["intervals"]["ece"]["value"])
    assert entry["test"]["ece_before"] == pytest.approx(summary["test"]["intervals"]["ece_uncalibrated"]["value"])

    run_cli("predict", "--config", cfg, "--runs_dir", runs, "--ckpt_path", edited, "--data.predict_path", multilabel_set)
    rows = {r["path"]: r for r in _read_csv(run / "predictions.csv")}
    for r in records.records:  # the same images: probabilities are sigmoid(logit / T)
        probs = [float(rows[r.meta["path"]][f"p_{c}"]) for c in CLASSES]
        assert probs == pytest.approx(list(_sigmoid(np.array(r.scores) / t)), abs=2e-6)
    for row in rows.values():  # decisions: the saved thresholds
        assert row["prediction"] == "|".join(c for c, th in zip(CLASSES, thresholds) if float(row[f"p_{c}"]) >= th)

    run_cli("export", "--ckpt_path", edited, "--out", tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "mmtune.json").read_text())
    assert meta["temperature"] == t and [meta["thresholds"][c] for c in CLASSES] == pytest.approx(thresholds)


def test_binary_operating_point_through_fit_and_test_and_refused_for_three_classes(tmp_path, tiny_models, color_set,
                                                                                    capsys):
    rows = [r for r in _read_csv(color_set) if r["label"] in ("red", "blue")]
    manifest = write_csv(color_set.parent / "binary.csv", ["path", "label", "group"],
                         [(r["path"], r["label"], r["group"]) for r in rows])
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "bin.yaml", tiny_models["cnn"], manifest,
                       model_args={"adapter": {"method": "none"}, "calibration": "temperature",
                                   "operating_point": {"specificity": 0.9, "positive": "red"}},
                       trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = only_version(runs, "bin")
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--evaluation.bootstrap.resamples", "20")
    records = read_records(run / "records" / "test.jsonl")
    t, threshold = records.info["temperature"], records.info["thresholds"][1]
    assert records.info["thresholds"][0] is None and records.info["operating_point"]["positive_class"] == "red"
    for r in records.records:  # classes are [blue, red]: red exactly when its calibrated probability reaches t
        z = np.array(r.scores) / t
        p_red = np.exp(z[1]) / np.exp(z).sum()
        assert r.prediction == ([1] if p_red >= threshold else [0])
    assert json.loads((run / "metrics.json").read_text())["calibration"]["thresholds"] == {"red": pytest.approx(threshold)}

    three = write_config(tmp_path / "three.yaml", tiny_models["cnn"], color_set,
                         model_args={"adapter": {"method": "none"}, "operating_point": "youden"},
                         trainer={"max_epochs": 1})
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", three, "--runs_dir", runs)
    assert "3 exclusive classes" in capsys.readouterr().err

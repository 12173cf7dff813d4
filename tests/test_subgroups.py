"""Subgroup audits: per-group metrics with intervals, worst group and gap, equalized-odds gaps (against
Fairlearn and a hand computation), bad input, and `mmtune test` / `mmtune evaluate` through the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import only_version, run_cli
from mmtune.errors import ConfigError
from mmtune.evaluation.bootstrap import BootstrapSpec, intervals
from mmtune.evaluation.spec import EvaluationSpec
from mmtune.evaluation.subgroups import MISSING, audit, audit_column, compare_subgroups, subset
from mmtune.metrics.records import RecordSet, SampleRecord

SPEC = BootstrapSpec(resamples=200, seed=3)

# A binary table worked by hand. Site A: positives predicted (1, 1, 0), negatives (0, 0, 1): accuracy
# 4/6, sensitivity 2/3, specificity 2/3. Site B: positives (1, 0), negatives (0, 0): accuracy 3/4,
# sensitivity 1/2, specificity 1.
TABLE = [("A", 1, 1), ("A", 1, 1), ("A", 1, 0), ("A", 0, 0), ("A", 0, 0), ("A", 0, 1),
         ("B", 1, 1), ("B", 1, 0), ("B", 0, 0), ("B", 0, 0)]


def _records(rows, classes=("ok", "defect"), column="site") -> RecordSet:
    records = []
    for i, (group, target, predicted) in enumerate(rows):
        logits = [0.0, 0.0]
        logits[predicted] = 2.0 + 0.1 * i  # distinct scores: no ties in the ranking metrics
        meta = {} if group is ... else {column: group}
        records.append(SampleRecord(id=f"row {i}", target=[target], prediction=[predicted], scores=logits, meta=meta))
    return RecordSet("classification", records, {"classes": list(classes), "multi_label": False})


def _by_group(entry: dict) -> dict:
    return {g["group"]: g for g in entry["groups"]}


def test_group_numbers_equal_a_hand_computation():
    entry = audit_column(_records(TABLE), "site", min_group_size=5, spec=SPEC)
    groups = _by_group(entry)
    assert [g["group"] for g in entry["groups"]] == ["A", "B"]
    assert (groups["A"]["size"], groups["A"]["small"]) == (6, False)
    assert (groups["B"]["size"], groups["B"]["small"]) == (4, True)  # below 5: flagged, kept
    a, b = groups["A"]["metrics"], groups["B"]["metrics"]
    assert a["accuracy"]["value"] == pytest.approx(4 / 6) and b["accuracy"]["value"] == pytest.approx(3 / 4)
    assert a["sensitivity/defect"]["value"] == pytest.approx(2 / 3)
    assert b["sensitivity/defect"]["value"] == pytest.approx(1 / 2)
    assert a["specificity/defect"]["value"] == pytest.approx(2 / 3) and b["specificity/defect"]["value"] == 1.0
    # one-vs-rest for the other class: its sensitivity is the specificity of `defect`
    assert a["sensitivity/ok"]["value"] == pytest.approx(2 / 3) and b["sensitivity/ok"]["value"] == 1.0
    assert entry["worst"]["accuracy"] == {"group": "A", "value": pytest.approx(4 / 6), "small": False}
    assert entry["gap"]["accuracy"] == pytest.approx(3 / 4 - 4 / 6)
    assert entry["worst"]["ece"]["value"] == max(a["ece"]["value"], b["ece"]["value"])  # lower is better
    # each group's intervals are the bootstrap of that group's records alone
    alone = intervals(subset(_records(TABLE), np.arange(6)), SPEC)
    assert a["accuracy"] == alone["accuracy"].as_dict()
    assert a["accuracy"]["ci_low"] <= a["accuracy"]["value"] <= a["accuracy"]["ci_high"]
    assert entry["min_group_size"] == 5


def test_equalized_odds_equal_fairlearn_and_the_hand_value():
    from fairlearn.metrics import equalized_odds_difference

    entry = audit_column(_records(TABLE), "site", min_group_size=1, spec=SPEC)
    defect = entry["equalized_odds"]["defect"]
    assert defect["sensitivity_gap"] == pytest.approx(2 / 3 - 1 / 2)
    assert defect["specificity_gap"] == pytest.approx(1 - 2 / 3)
    assert defect["equalized_odds_difference"] == pytest.approx(1 / 3)  # max(TPR gap 1/6, FPR gap 1/3)
    y_true, y_pred = [t for _, t, _ in TABLE], [p for _, _, p in TABLE]
    sites = [g for g, _, _ in TABLE]
    assert defect["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y_true, y_pred, sensitive_features=sites))
    ok = entry["equalized_odds"]["ok"]  # one-vs-rest: the roles of the two rates swap
    assert (ok["sensitivity_gap"], ok["specificity_gap"]) == (pytest.approx(1 / 3), pytest.approx(1 / 6))
    assert ok["equalized_odds_difference"] == pytest.approx(1 / 3)


def test_a_group_without_positives_leaves_sensitivity_undefined_not_zero():
    # Site C has no defects: its sensitivity is undefined (Fairlearn's rate would say 0, a gap of 2/3).
    rows = TABLE + [("C", 0, 0), ("C", 0, 1)]
    entry = audit_column(_records(rows), "site", min_group_size=1, spec=SPEC)
    defect = entry["equalized_odds"]["defect"]
    assert defect["sensitivity_gap"] == pytest.approx(2 / 3 - 1 / 2)
    assert defect["specificity_gap"] == pytest.approx(1 - 1 / 2)  # C: one of two negatives called a defect
    assert defect["equalized_odds_difference"] == pytest.approx(1 / 2)
    assert _by_group(entry)["C"]["metrics"]["sensitivity/defect"]["value"] is None


def test_missing_column_names_it_and_the_columns_that_exist():
    with pytest.raises(ConfigError, match=r"no column 'scanner'.*columns are: site"):
        audit(_records(TABLE), EvaluationSpec(bootstrap=SPEC, subgroups=["scanner"]))


def test_records_without_a_value_form_the_missing_group():
    rows = TABLE + [(None, 1, 1), ("", 0, 0), ("  ", 0, 1), (..., 1, 0)]  # None, blank, spaces, no key
    entry = audit_column(_records(rows), "site", min_group_size=5, spec=SPEC)
    assert [g["group"] for g in entry["groups"]] == ["A", "B", MISSING]  # last, counted, not dropped
    missing = _by_group(entry)[MISSING]
    assert missing["size"] == 4 and missing["small"] is True
    assert missing["metrics"]["accuracy"]["value"] == pytest.approx(2 / 4)
    assert sum(g["size"] for g in entry["groups"]) == len(rows)


def test_a_one_sample_group_has_a_value_without_an_interval():
    rows = TABLE + [("D", 1, 0)]
    entry = audit_column(_records(rows), "site", min_group_size=30, spec=SPEC)
    one = _by_group(entry)["D"]
    assert one["size"] == 1 and one["small"] is True
    assert one["metrics"]["accuracy"] == {"value": 0.0, "ci_low": None, "ci_high": None}
    assert entry["worst"]["accuracy"] == {"group": "D", "value": 0.0, "small": True}  # shown as small
    assert all(g["small"] for g in entry["groups"])
    json.dumps(entry, allow_nan=False)  # nothing NaN reaches metrics.json


def test_per_group_comparison_of_tuned_and_baseline():
    tuned = _records(TABLE)
    worse = _records([(g, t, 1 - p if g == "B" else p) for g, t, p in TABLE])  # wrong on every B sample
    out = compare_subgroups(tuned, worse, EvaluationSpec(bootstrap=SPEC, subgroups=["site"], min_group_size=5))
    groups = {g["group"]: g for g in out["site"]["groups"]}
    assert groups["A"]["comparison"]["accuracy"]["difference"] == 0.0
    b = groups["B"]["comparison"]["accuracy"]
    assert b["baseline"] == pytest.approx(1 / 4) and b["tuned"] == pytest.approx(3 / 4)
    assert b["difference"] == pytest.approx(1 / 2)
    assert groups["B"]["small"] is True and out["site"]["min_group_size"] == 5


def test_fairlearn_missing_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fairlearn", None)
    monkeypatch.setitem(sys.modules, "fairlearn.metrics", None)
    with pytest.raises(ConfigError, match=r"pip install 'mmtune\[eval\]'"):
        audit(_records(TABLE), EvaluationSpec(bootstrap=SPEC, subgroups=["site"]))


def test_retrieval_records_are_audited_per_group_and_direction():
    # queries of both directions; rank 0 is a hit at R@1; site north: i2t ranks 0, 3; t2i ranks 0, 0
    ranks = [("i2t", "north", 0), ("i2t", "north", 3), ("i2t", "south", 1), ("i2t", "south", 7),
             ("t2i", "north", 0), ("t2i", "north", 0), ("t2i", "south", 2), ("t2i", "south", 0)]
    records = RecordSet("retrieval", [SampleRecord(id=f"{d}:{i}", stats={"rank": float(r)},
                                                   meta={"direction": d, "site": s})
                                      for i, (d, s, r) in enumerate(ranks)], {"recall_at": [1, 5]})
    entry = audit_column(records, "site", min_group_size=3, spec=SPEC)
    north, south = _by_group(entry)["north"]["metrics"], _by_group(entry)["south"]["metrics"]
    assert north["i2t_r@1"]["value"] == 0.5 and north["t2i_r@1"]["value"] == 1.0
    assert south["i2t_r@1"]["value"] == 0.0 and south["i2t_r@5"]["value"] == 0.5 and south["t2i_r@1"]["value"] == 0.5
    assert south["i2t_mrr"]["value"] == pytest.approx((1 / 2 + 1 / 8) / 2)
    assert north["mean_recall"]["value"] == pytest.approx((0.5 + 1.0 + 1.0 + 1.0) / 4)
    assert entry["worst"]["mean_recall"]["group"] == "south" and "equalized_odds" not in entry


# ---- through the CLI --------------------------------------------------------------------------------
ROOT = Path(__file__).parent.parent


def test_the_demo_config_audits_production_lines(tmp_path, tiny_models, capsys):
    """The demo's own config (`evaluation: {subgroups: [line], min_group_size: 20}`) on its data
    maker's output, with a tiny model in place of EfficientNet-Lite0: `test` and `evaluate` write
    the audit of the manifest's `line` column."""
    spec = importlib.util.spec_from_file_location("make_defect_data", ROOT / "tools" / "make_defect_data.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    manifest = maker.make_defect_dataset(tmp_path / "defects", per_class=10, size=32, seed=0, lots=8)
    cfg = ROOT / "configs" / "examples" / "defects_demo.yaml"
    args = ["--config", cfg, "--runs_dir", tmp_path / "runs", f"--model.init_args.model.name={tiny_models['cnn']}",
            f"--data.init_args.path={manifest}",
            "--data.init_args.image_size=32", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
            "--data.init_args.split=[0.5,0.2,0.3]", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false", "--evaluation.bootstrap.resamples=50"]
    run_cli("fit", *args)
    run = only_version(tmp_path / "runs", "defects_demo")
    capsys.readouterr()
    run_cli("test", *args, "--ckpt_path", "best")
    test = json.loads((run / "metrics.json").read_text())["test"]
    lines = {r["line"] for r in csv.DictReader(manifest.open())}
    audited = test["subgroups"]["line"]
    assert audited["min_group_size"] == 20
    assert {g["group"] for g in audited["groups"]} <= lines and audited["groups"]
    assert sum(g["size"] for g in audited["groups"]) == test["samples"]
    for g in audited["groups"]:
        assert g["small"] == (g["size"] < 20)
        assert {"accuracy", "f1_macro", "sensitivity/crack", "specificity/crack"} <= set(g["metrics"])
    assert set(audited["equalized_odds"]) == {"clean", "crack", "scratch", "spot"}
    assert set(audited["worst"]) <= set(audited["gap"])
    out = capsys.readouterr().out
    assert "subgroups by 'line'" in out and "worst accuracy:" in out

    best = run / "checkpoints" / "best.ckpt"
    run_cli("evaluate", *args, "--ckpt_path", "best", "--baseline", best)
    compared = json.loads((run / "metrics.json").read_text())["evaluate"]["subgroups"]["line"]
    assert [g["size"] for g in compared["groups"]] == [g["size"] for g in audited["groups"]]
    for g in compared["groups"]:
        assert g["comparison"]["accuracy"]["difference"] == 0.0  # the model against itself


def test_a_misnamed_column_stops_test_with_the_columns_that_exist(tmp_path, tiny_models, color_set, capsys):
    from conftest import write_config

    cfg = write_config(tmp_path / "colors.yaml", tiny_models["cnn"], color_set,
                       model_args={"adapter": {"method": "none"}})
    with pytest.raises(SystemExit):
        run_cli("test", "--config", cfg, "--runs_dir", tmp_path / "runs", "--evaluation.subgroups=[scanner]",
                "--evaluation.bootstrap.resamples=20")
    err = capsys.readouterr().err
    assert "no column 'scanner'" in err and "group" in err and "path" in err
    test = json.loads((only_version(tmp_path / "runs", "colors") / "metrics.json").read_text())["test"]
    assert "accuracy" in test["intervals"]  # the intervals were saved before the audit stopped


def test_an_alignment_test_audits_a_pair_manifest_column(tmp_path):
    from support.tiny_align import make_pair_set, save_tiny_clip
    from test_alignment import align_config

    pairs = make_pair_set(tmp_path / "pairs", per_kind=4)
    rows = list(csv.DictReader(pairs.open()))
    for i, row in enumerate(rows):
        row["site"] = "" if i == 0 else ("north" if i % 2 else "south")
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0]])
        writer.writeheader()
        writer.writerows(rows)
    cfg = align_config(tmp_path / "clip.yaml", save_tiny_clip(tmp_path / "clip"), pairs)
    run_cli("test", "--config", cfg, "--runs_dir", tmp_path / "runs", "--evaluation.subgroups=[site]",
            "--evaluation.min_group_size=5", "--evaluation.bootstrap.resamples=50")
    test = json.loads((only_version(tmp_path / "runs", "clip") / "metrics.json").read_text())["test"]
    audited = test["subgroups"]["site"]
    assert {g["group"] for g in audited["groups"]} <= {"north", "south", MISSING}
    assert sum(g["size"] for g in audited["groups"]) == test["samples"]  # queries of both directions
    assert all({"i2t_r@1", "t2i_r@1", "mean_recall"} <= set(g["metrics"]) for g in audited["groups"] if g["size"] > 4)

"""Continual fine-tuning: class-incremental stages, replay, leakage, forgetting metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_config, write_csv

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "yellow": (200, 200, 40)}


def _stage(root: Path, names: list[str], per_class: int = 14, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(0, 40, (32, 32, 3)) + COLORS[name], 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name))
    return write_csv(root / "manifest.csv", ["path", "label"], rows)


def test_forgetting_summary_by_hand():
    from mmtune.continual.run import forgetting_summary

    out = forgetting_summary([[0.9], [0.5, 0.8], [0.6, 0.7, 0.95]])
    assert out["average_forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)
    assert out["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)


def test_grown_head_keeps_old_rows_and_replay_is_seeded():
    from mmtune.continual.run import grow_tensors
    from mmtune.continual.stages import draw_replay, grown_classes

    prev = {"head.weight": torch.ones(2, 4), "head.bias": torch.ones(2), "lora_A": torch.full((3, 3), 2.0)}
    fresh = {"head.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4), "lora_A": torch.zeros(3, 3)}
    out = grow_tensors(prev, fresh, 2, 4)
    assert out["head.weight"][:2].eq(1).all() and out["head.weight"][2:].eq(0).all()
    assert out["lora_A"].eq(2).all()
    pool = [{"path": f"{i}.png", "label": "a"} for i in range(50)]
    assert draw_replay(pool, 10, 0, 3) == draw_replay(pool, 10, 0, 3)
    assert len(draw_replay(pool, 0, 0.2, 3)) == 10
    assert grown_classes(["b", "a"], [{"label": "c"}, {"label": "a"}]) == ["b", "a", "c"]


def test_a_stage_repeating_earlier_test_samples_is_a_leakage_error(tmp_path, tiny_models):
    from mmtune.continual.cli import read_configs
    from mmtune.continual.run import run_continual
    from mmtune.errors import DataError

    first = _stage(tmp_path / "s1", ["red", "green"], per_class=6)
    config = write_config(tmp_path / "task.yaml", tiny_models["vit"], first,
                          model_args={"adapter": {"method": "lora", "r": 4}},
                          data_args={"group_column": None, "verify_images": False}, trainer={"max_epochs": 1})
    (tmp_path / "c.yaml").write_text(f"continual:\n  stages: [{first}, {first}]\n")
    cfg, spec = read_configs(str(config), str(tmp_path / "c.yaml"))
    with pytest.raises(DataError, match="stage_1 repeats .* test sample"):
        run_continual(cfg, spec, tmp_path / "run")


@pytest.mark.slow
def test_replay_forgets_less_in_a_two_stage_class_incremental_run(tmp_path, tiny_models):
    from mmtune.continual.cli import read_configs
    from mmtune.continual.run import run_continual

    first = _stage(tmp_path / "s1", ["red", "green"], seed=1)
    second = _stage(tmp_path / "s2", ["blue", "yellow"], seed=2)
    config = write_config(tmp_path / "task.yaml", tiny_models["vit"], first,
                          model_args={"adapter": {"method": "lora", "r": 4}, "monitor": {"early_stopping": False}},
                          data_args={"group_column": None, "verify_images": False}, trainer={"max_epochs": 3})
    results = {}
    # Replay of every earlier training sample: with half of them, 3 epochs of a tiny random ViT sometimes
    # forgot stage 0 as fully as no replay did (10 old rows against 24 new), so the test was a coin.
    for label, replay in (("none", {}), ("replay", {"share": 1.0, "seed": 0})):
        (tmp_path / f"{label}.yaml").write_text(json.dumps({"continual": {"stages": [str(first), str(second)],
                                                                          "replay": replay}}))
        cfg, spec = read_configs(str(config), str(tmp_path / f"{label}.yaml"))
        results[label] = run_continual(cfg, spec, tmp_path / label)
        assert (tmp_path / label / "stage_1" / "replay.csv").is_file()
        assert json.loads((tmp_path / label / "metrics.json").read_text())["continual"]["accuracy_matrix"]
    assert results["replay"]["stages"][1]["classes"] == ["green", "red", "blue", "yellow"]
    assert results["replay"]["stages"][1]["replayed"] > 0 and results["none"]["stages"][1]["replayed"] == 0
    summary = {k: (v["accuracy_matrix"], v["average_forgetting"]) for k, v in results.items()}
    assert results["replay"]["average_forgetting"] < results["none"]["average_forgetting"], summary


def test_lwf_adds_the_gradient_of_the_distillation_term():
    from mmtune.continual.run import LwFDistillation

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    pixels = torch.randn(5, 4)
    lwf = LwFDistillation(teacher, old_classes=2, weight=0.5, temperature=2.0)
    lwf.on_train_batch_start(None, student, {"pixels": pixels}, 0)
    lwf.on_before_optimizer_step(None, student, None)
    by_hand = torch.nn.Linear(4, 3)
    by_hand.load_state_dict(student.state_dict())
    t = teacher(pixels)[:, :2].detach()
    loss = torch.nn.functional.kl_div(torch.log_softmax(by_hand(pixels)[:, :2] / 2, -1), torch.softmax(t / 2, -1),
                                      reduction="batchmean") * 0.5 * 4
    loss.backward()
    torch.testing.assert_close(student.weight.grad, by_hand.weight.grad)
    assert student.weight.grad[2].abs().sum() == 0  # new classes are not distilled


def test_the_report_shows_the_accuracy_matrix_forgetting_and_backward_transfer(tmp_path):
    from mmtune.continual.run import forgetting_summary
    from mmtune.evaluation.report import build_report

    matrix = [[0.9, None], [0.6, 0.8]]
    summary = forgetting_summary([[v for v in r if v is not None] for r in matrix])
    (tmp_path / "metrics.json").write_text(json.dumps({"continual": {"stages": ["plant_a", "plant_b"],
                                                                     "accuracy_matrix": matrix, **summary}}))
    html = build_report(tmp_path).html
    section = html[html.index('id="continual"'):]
    section = section[:section.index("</section>")]
    assert "after plant_b" in section and "plant_a test" in section
    assert ">0.600<" in section and ">0.800<" in section and ">–<" in section  # the stage not yet trained
    assert "0.3000" in section and "-0.3000" in section  # forgetting 0.9 - 0.6, backward transfer 0.6 - 0.9

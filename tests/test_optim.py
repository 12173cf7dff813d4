"""Parameter groups (no decay on norms/biases, layer-wise decay, per-part lr) and schedules."""

from __future__ import annotations

import pytest
import torch

from mmtune import ConfigError, ModelSpec, OptimizerSpec
from mmtune.models.vision import CLASSIFIER_FAMILIES, build_classifier
from mmtune.optim import lr_lambda, param_groups


def _vit(tiny_models):
    return build_classifier(ModelSpec(name=str(tiny_models["vit"])), 3)


def test_no_decay_on_norms_biases_and_listed_names(tiny_models):
    clf = _vit(tiny_models)
    groups = param_groups(clf.module.named_parameters(), OptimizerSpec(weight_decay=0.1),
                          no_decay=clf.module.no_weight_decay())
    by_param = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(clf.module.named_parameters())
    assert by_param[id(named["blocks.0.norm1.weight"])] == 0.0
    assert by_param[id(named["blocks.0.attn.qkv.bias"])] == 0.0
    assert by_param[id(named["pos_embed"])] == 0.0  # listed by the model's no_weight_decay()
    assert by_param[id(named["blocks.0.attn.qkv.weight"])] == 0.1


def test_layer_decay_and_part_lrs(tiny_models):
    clf = _vit(tiny_models)
    ids = CLASSIFIER_FAMILIES.get("timm").layer_ids(clf.module, clf.head)
    spec = OptimizerSpec(lr=1.0, layer_decay=0.5, part_lrs={"head": 2.0})
    part_of = lambda n: "head" if n.startswith("head") else "backbone"  # noqa: E731
    groups = param_groups(clf.module.named_parameters(), spec, layer_ids=ids, part_of=part_of,
                          part_names=["backbone", "head"])
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(clf.module.named_parameters())
    top = max(ids.values())
    assert lr[id(named["head.weight"])] == 2.0
    assert lr[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** (top - ids["blocks.0.attn.qkv.weight"]))
    assert lr[id(named["blocks.0.attn.qkv.weight"])] < lr[id(named["blocks.1.attn.qkv.weight"])]
    with pytest.raises(ConfigError, match="unknown part"):
        param_groups(clf.module.named_parameters(), OptimizerSpec(part_lrs={"vision": 1.0}), part_names=["backbone", "head"])


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = param_groups(model.named_parameters(), OptimizerSpec())
    assert sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    f = lr_lambda(OptimizerSpec(schedule=schedule, warmup=10, min_lr_ratio=0.1), total_steps=100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    if schedule == "constant":
        assert f(99) == 1.0
    else:
        assert f(50) < 1.0 and f(100) == pytest.approx(0.1)
    assert lr_lambda(OptimizerSpec(warmup=0.2), 50)(9) < 1.0  # fraction of steps

"""The shared adapter injection: default targets per family, peft methods, freeze policies."""

from __future__ import annotations

import pytest
import torch

from mmtune import AdapterSpec, ConfigError, ModelSpec
from mmtune.adapters import apply_adapter
from mmtune.models.vision import CLASSIFIER_FAMILIES, build_classifier


def _adapt(model_dir, spec: AdapterSpec, num_classes=3):
    clf = build_classifier(ModelSpec(name=str(model_dir)), num_classes)
    family = CLASSIFIER_FAMILIES.get(clf.family)
    net, report = apply_adapter(clf.module, spec, clf.family, {"backbone": None, "head": clf.head},
                                {"backbone": "adapter", "head": "full"},
                                layer_ids=lambda raw: family.layer_ids(raw, clf.head))
    return clf, net, report


def _trainable(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_vit_methods_target_attention_and_mlp(tiny_models, method):
    clf, net, report = _adapt(tiny_models["vit"], AdapterSpec(method=method, r=4))
    depth = len(clf.module.blocks) if hasattr(clf.module, "blocks") else len(net.get_base_model().blocks)
    assert len(report.adapted) == 4 * depth  # qkv, proj, fc1, fc2 in every block
    assert {n.rsplit(".", 1)[-1] for n in report.adapted} == {"qkv", "proj", "fc1", "fc2"}
    assert not any("patch_embed" in n or n.startswith("head") for n in report.adapted)
    trainable = _trainable(net)
    assert any(".head." in n or n.endswith("head.weight") for n in trainable), "head must train"
    assert not any(n.endswith("qkv.base_layer.weight") for n in trainable), "base weights stay frozen"
    assert 0 < report.trainable < report.total
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 3)


def test_cnn_targets_convs_and_trains_batchnorm_free(tiny_models):
    clf, net, report = _adapt(tiny_models["cnn"], AdapterSpec(method="lora", r=4))
    raw = net.get_base_model()
    convs = [n for n, m in clf.module.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert report.adapted and set(report.adapted) <= set(convs) | {n for n in report.adapted}
    assert all(isinstance(raw.get_submodule(n).base_layer, torch.nn.Conv2d) for n in report.adapted)
    assert "fc" not in report.adapted


def test_spec_matching_nothing_fails_loudly(tiny_models):
    with pytest.raises(ConfigError, match="match no layer"):
        _adapt(tiny_models["vit"], AdapterSpec(method="lora", targets=["query", "value"]))  # pre-v5 names
    with pytest.raises(ConfigError, match="match no layer"):
        _adapt(tiny_models["vit"], AdapterSpec(method="lora", targets=r"blocks\.\d+\.attn\.nothing"))


def test_explicit_names_and_regex(tiny_models):
    _, _, by_name = _adapt(tiny_models["vit"], AdapterSpec(method="lora", targets=["qkv"]))
    assert by_name.adapted and all(n.endswith(".qkv") for n in by_name.adapted)
    _, _, by_regex = _adapt(tiny_models["vit"], AdapterSpec(method="lora", targets=r"blocks\.0\.mlp\.fc\d", exclude="fc2"))
    assert by_regex.adapted == ["blocks.0.mlp.fc1"]


def test_linear_probe_trains_only_the_head(tiny_models):
    clf, net, report = _adapt(tiny_models["cnn"], AdapterSpec(method="none", parts={"backbone": "frozen"}))
    assert _trainable(net) == {"fc.weight", "fc.bias"} and report.policies == {"backbone": "frozen", "head": "full"}


def test_last_n_blocks(tiny_models):
    clf, net, _ = _adapt(tiny_models["vit"], AdapterSpec(method="none", parts={"backbone": "frozen"}, train_last_n_blocks=1))
    trainable = _trainable(net)
    last = len(net.blocks) - 1
    assert any(n.startswith(f"blocks.{last}.") for n in trainable)
    assert not any(n.startswith(f"blocks.{last - 1}.") or n.startswith("patch_embed") for n in trainable)


def test_full_finetune_trains_everything(tiny_models):
    _, net, report = _adapt(tiny_models["vit"], AdapterSpec())
    assert report.trainable == report.total


def test_unknown_part_and_all_frozen_are_errors(tiny_models):
    with pytest.raises(ConfigError, match="unknown part"):
        _adapt(tiny_models["vit"], AdapterSpec(parts={"vision": "frozen"}))
    with pytest.raises(ConfigError, match="nothing would train"):
        _adapt(tiny_models["vit"], AdapterSpec(parts={"backbone": "frozen", "head": "frozen"}))


def test_torchvision_backbone(tmp_path):
    clf = build_classifier(ModelSpec(name="tv:resnet18", pretrained=False), 5)
    assert clf.head == ["fc"] and clf.module.fc.out_features == 5 and clf.data_config["input_size"] == (3, 224, 224)
    ids = CLASSIFIER_FAMILIES.get("torchvision").layer_ids(clf.module, clf.head)
    assert ids["fc.weight"] == max(ids.values()) and ids["conv1.weight"] < ids["layer4.1.conv2.weight"]
    net, report = apply_adapter(clf.module, AdapterSpec(method="lora", r=2), "torchvision",
                                {"backbone": None, "head": clf.head}, {"backbone": "adapter", "head": "full"})
    # every conv of resnet18 incl. downsample 1x1 but the stem (mmtune.adapters.targets.CNN_MIN_CHANNELS)
    assert len(report.adapted) == 19 and "conv1" not in report.adapted
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_torchvision_weights_file(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    clf = build_classifier(ModelSpec(name="tv:resnet18", checkpoint=str(tmp_path / "r18.pth")), 4)
    assert torch.equal(clf.module.conv1.weight, state["conv1.weight"]) and clf.module.fc.out_features == 4

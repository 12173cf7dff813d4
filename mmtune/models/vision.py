"""Image classifiers from timm and torchvision, behind one small contract.

A family knows how to build a classifier from a `ModelSpec` through its own factory
(`timm.create_model`, `torchvision.models.get_model`), which module is the head, how parameters group
into blocks (for layer-wise lr decay and "train the last N blocks"), the input size and
normalization its weights expect, and how to write the family's native export format.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from mmtune.errors import ModelError
from mmtune.registry import Registry
from mmtune.specs import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class VisionClassifier:
    """A built classifier and what the task needs to know about it.

    Attributes:
        module: the network (logits = module(pixels)).
        family: registry name of the family that built it.
        head: dotted names of the classification layers (trained fully, never adapted).
        data_config: `input_size` (C, H, W), `mean`, `std`, `interpolation`, `crop_pct`.
        arch: the architecture name in the family's factory (for export).
    """

    module: nn.Module
    family: str
    head: list[str]
    data_config: dict
    arch: str = ""


class ClassifierFamily(Protocol):
    def build(self, ref: str, spec: ModelSpec, num_classes: int) -> VisionClassifier: ...

    def data_config(self, ref: str, spec: ModelSpec) -> dict: ...

    def layer_ids(self, module: nn.Module, head: list[str]) -> dict[str, int]: ...

    def export(self, clf: VisionClassifier, out_dir: Path, classes: list[str]) -> None: ...


CLASSIFIER_FAMILIES: Registry[ClassifierFamily] = Registry("image classifier family")


def _offline_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {str(err)[:200]}). "
        "Without a network, point model.name at a local directory (timm `save_for_hf` layout, or an "
        "`mmtune export` folder), or keep the architecture name and set model.checkpoint to a local "
        "weights file (.safetensors/.pth); or set model.pretrained: false to start from random weights."
    )


def _weights_in(path: Path) -> bool:
    return path.is_file() and path.suffix in WEIGHT_SUFFIXES


def resolve_classifier_ref(spec: ModelSpec) -> tuple[str, str]:
    """Returns (family, reference) for a model name: explicit prefix, local directory, or known name."""
    name = spec.name
    for prefix, family in (("timm:", "timm"), ("tv:", "torchvision"), ("torchvision:", "torchvision")):
        if name.startswith(prefix):
            ref = name[len(prefix):]
            _check_known_name(name, family, ref, prefix)
            return family, ref
    if name.startswith("hf-hub:"):
        return "timm", name
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"model directory {path} has no config.json (expected timm `save_for_hf` or `mmtune export` output)")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("mmtune_family") == "torchvision":
            return "torchvision", str(path)
        if "architecture" in cfg:
            return "timm", f"local-dir:{path}"
        raise ModelError(
            f"{cfg_file} is not a timm or mmtune image-classifier config (no 'architecture' key); "
            "transformers image classifiers are not supported by this task yet: use a timm name"
        )
    if _weights_in(path):
        raise ModelError(
            f"model.name {name!r} is a weights file: set model.name to its architecture "
            f"(e.g. timm:resnet50) and model.checkpoint to {name!r}"
        )
    import timm
    import torchvision

    if timm.is_model(name):
        return "timm", name
    if name in torchvision.models.list_models():
        return "torchvision", name
    candidates = list(timm.list_models()) + [f"tv:{n}" for n in torchvision.models.list_models()]
    raise ModelError(f"unknown model {name!r}: not a timm or torchvision name, nor a local directory."
                     f"{_close_names(name, candidates)}")


def _close_names(name: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" Close names: {', '.join(prefix + c for c in close)}." if close else ""


def _check_known_name(name: str, family: str, ref: str, prefix: str) -> None:
    """A prefixed name (`timm:resnet1`) is checked like a bare one, so a typo gets close names instead
    of the factory's bare "Unknown model" error at build time. Refs with their own source
    (`timm:hf-hub:...`, `timm:local-dir:...`) are left to the factory."""
    if ":" in ref:
        return
    if family == "timm":
        import timm

        if not timm.is_model(ref):  # accepts pretrained tags (resnet50.a1_in1k)
            raise ModelError(f"unknown model {name!r}: not a timm name.{_close_names(ref, timm.list_models(), prefix)}")
    else:
        import torchvision

        known = torchvision.models.list_models()
        if ref not in known:
            raise ModelError(f"unknown model {name!r}: not a torchvision name.{_close_names(ref, known, prefix)}")


def build_classifier(spec: ModelSpec, num_classes: int) -> VisionClassifier:
    """Builds the classifier named by `spec` with a head of `num_classes` outputs."""
    family, ref = resolve_classifier_ref(spec)
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise ModelError(f"model.checkpoint {spec.checkpoint} does not exist")
    return CLASSIFIER_FAMILIES.get(family).build(ref, spec, num_classes)


def classifier_data_config(spec: ModelSpec) -> dict:
    """The input size and normalization the model's weights expect, without loading weights."""
    family, ref = resolve_classifier_ref(spec)
    return CLASSIFIER_FAMILIES.get(family).data_config(ref, spec)


def _load_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class TimmFamily:
    """Any model `timm.list_models()` knows, a timm hub id, or a timm local directory."""

    def _kwargs(self, spec: ModelSpec) -> dict:
        kwargs = dict(spec.kwargs)
        if spec.checkpoint:
            # timm's own loader maps the file: drops a mismatched classifier, adapts in_chans.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(spec.checkpoint))
        return kwargs

    def build(self, ref: str, spec: ModelSpec, num_classes: int) -> VisionClassifier:
        import timm

        pretrained = spec.pretrained or bool(spec.checkpoint)
        try:
            module = timm.create_model(ref, pretrained=pretrained, num_classes=num_classes, **self._kwargs(spec))
        except OSError as err:
            raise _offline_error(spec.name, err) from err
        except RuntimeError as err:
            if "state_dict" in str(err) or "size mismatch" in str(err):
                raise ModelError(f"weights for {spec.name!r} do not fit its architecture: {str(err)[:600]}") from err
            raise
        head = module.pretrained_cfg.get("classifier") or []
        head = [head] if isinstance(head, str) else list(head)
        head = [h for h in head if _has_module(module, h)]
        if not head:
            head = [n for n, m in module.named_modules() if m is module.get_classifier()]
        data_config = timm.data.resolve_model_data_config(module)
        return VisionClassifier(module, "timm", head, _plain(data_config), module.pretrained_cfg.get("architecture", ""))

    def data_config(self, ref: str, spec: ModelSpec) -> dict:
        import timm

        kwargs = {k: v for k, v in self._kwargs(spec).items() if k != "pretrained_cfg_overlay"}
        with torch.device("meta"):
            module = timm.create_model(ref, pretrained=False, **kwargs)
        return _plain(timm.data.resolve_model_data_config(module))

    def layer_ids(self, module: nn.Module, head: list[str]) -> dict[str, int]:
        from timm.models import group_parameters
        from timm.optim._param_groups import auto_group_layers

        if hasattr(module, "group_matcher"):
            ids = group_parameters(module, module.group_matcher(coarse=False), reverse=True)
        else:
            ids = auto_group_layers(module)
        return _head_last(ids, head)

    def export(self, clf: VisionClassifier, out_dir: Path, classes: list[str]) -> None:
        from timm.models import save_for_hf

        save_for_hf(clf.module, str(out_dir), model_config={"label_names": list(classes)}, safe_serialization=True)


class TorchvisionFamily:
    """`torchvision.models.get_model` names, or a directory written by `mmtune export`."""

    def build(self, ref: str, spec: ModelSpec, num_classes: int) -> VisionClassifier:
        import torchvision

        local = Path(ref) if Path(ref).is_dir() else None
        if local is not None:
            cfg = json.loads((local / "config.json").read_text())
            module = torchvision.models.get_model(cfg["architecture"], weights=None, num_classes=cfg["num_classes"], **spec.kwargs)
            if spec.pretrained:
                _load_strict(module, _load_file(str(local / "model.safetensors")), spec.name)
            data_config, arch = cfg["data_config"], cfg["architecture"]
        else:
            arch = ref
            weights = "DEFAULT" if spec.pretrained and not spec.checkpoint else None
            try:
                module = torchvision.models.get_model(ref, weights=weights, **spec.kwargs)
            except OSError as err:
                raise _offline_error(spec.name, err) from err
            if spec.checkpoint:
                _load_strict(module, _load_file(spec.checkpoint), spec.checkpoint, allow_head_mismatch=True)
            data_config = self.data_config(ref, spec)
        head = _last_linear(module)
        old = module.get_submodule(head)
        if old.out_features != num_classes:
            _set_module(module, head, nn.Linear(old.in_features, num_classes))
        return VisionClassifier(module, "torchvision", [head], data_config, arch)

    def data_config(self, ref: str, spec: ModelSpec) -> dict:
        import torchvision

        if Path(ref).is_dir():
            return json.loads((Path(ref) / "config.json").read_text())["data_config"]
        try:
            preset = torchvision.models.get_model_weights(ref).DEFAULT.transforms()
            crop, resize = preset.crop_size[0], preset.resize_size[0]
            return dict(
                input_size=(3, crop, crop), mean=tuple(preset.mean), std=tuple(preset.std),
                interpolation=preset.interpolation.value, crop_pct=crop / resize, crop_mode="center",
            )
        except (ValueError, AttributeError, KeyError):
            return dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        interpolation="bilinear", crop_pct=0.875, crop_mode="center")

    def layer_ids(self, module: nn.Module, head: list[str]) -> dict[str, int]:
        blocks = block_names(module)
        ids: dict[str, int] = {}
        for name, _ in module.named_parameters():
            ids[name] = next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), 0)
        return _head_last(ids, head)

    def export(self, clf: VisionClassifier, out_dir: Path, classes: list[str]) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clf.module.state_dict().items()}, str(out_dir / "model.safetensors"))
        head = clf.module.get_submodule(clf.head[0])
        cfg = dict(mmtune_family="torchvision", architecture=clf.arch, num_classes=head.out_features,
                   label_names=list(classes), data_config=clf.data_config)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


CLASSIFIER_FAMILIES.register("timm")(TimmFamily())
CLASSIFIER_FAMILIES.register("torchvision")(TorchvisionFamily())


def _plain(cfg: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()}


def _has_module(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _head_last(ids: dict[str, int], head: list[str]) -> dict[str, int]:
    """Puts every head parameter in one last group, after all blocks."""
    top = max((v for k, v in ids.items() if not _under(k, head)), default=0) + 1
    return {k: (top if _under(k, head) else v) for k, v in ids.items()}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _last_linear(module: nn.Module) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(module).__name__} has no nn.Linear classifier to replace")
    return names[-1]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def block_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of a backbone's blocks in forward order (ViT `blocks.i`, ResNet `layerN.i`, ...).

    Found by structure rather than by name (torchvision has no group matcher like timm's): the
    children in order, with the child holding most parameters (`features`, `encoder.layers`,
    `blocks`...) replaced by its own children, recursively; a Sequential/ModuleList's items are blocks.
    """
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 1:
        return [prefix + n for n, c in module.named_children() if any(True for _ in c.parameters())]
    children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    if not children:
        return [prefix.rstrip(".")]
    sizes = [sum(p.numel() for p in c.parameters()) for _, c in children]
    top = max(range(len(children)), key=sizes.__getitem__)
    if sizes[top] >= 0.5 * sum(sizes) and list(children[top][1].children()):
        return ([prefix + n for n, _ in children[:top]] + block_names(children[top][1], prefix + children[top][0] + ".")
                + [prefix + n for n, _ in children[top + 1:]])
    return [prefix + n for n, _ in children]


def _load_strict(module: nn.Module, state: dict, source: str, allow_head_mismatch: bool = False) -> None:
    """Loads `state` into `module`, naming what does not fit; with `allow_head_mismatch` a classifier
    of another size (e.g. ImageNet's 1000 classes) is left at its fresh initialization."""
    own = module.state_dict()
    head = [_last_linear(module)] if allow_head_mismatch else []
    state = {k: v for k, v in state.items() if not (_under(k, head) and k in own and own[k].shape != v.shape)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    head_keys = [k for k in missing if _under(k, head)]
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected or wrong:
        raise ModelError(
            f"weights in {source} do not fit {type(module).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}). Is it a checkpoint of another architecture?"
        )
    module.load_state_dict(state, strict=not head_keys)

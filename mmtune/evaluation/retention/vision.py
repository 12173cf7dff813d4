"""Retention of image classifiers (`feature_agreement`): on a reference image folder (no labels needed),
how close the tuned backbone's pooled features stay to the untuned model's, and how often the
pretrained model's own head (e.g. its 1000 ImageNet classes) still predicts the same class from them.

The tuned classifier has a new head with the user's classes, so the original head comes from the base
model, built once from the task's model spec with the number of classes its weights have. The pooled
features are the input of the classification layer, caught by a forward pre-hook: the same point for
timm and torchvision models, adapters or not.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mmtune.data.classification import ImageClassificationDataset
from mmtune.data.readers import ManifestColumns, read_image_labels
from mmtune.data.transforms import AugmentSpec, build_transform
from mmtune.errors import ModelError
from mmtune.evaluation.retention.scorers import SCORERS, Runner, Scorer, limited
from mmtune.evaluation.retention.spec import RetentionSet
from mmtune.specs import ModelSpec

log = logging.getLogger("mmtune")


@SCORERS.register("feature_agreement")
class FeatureAgreementScorer(Scorer):
    """`feature_similarity`: mean cosine similarity of each image's pooled features with the untuned
    model's; `head_agreement`: share of images whose original-head top-1 class is unchanged (only when
    the base model has a head: pretrained weights with classes). The first score is the untuned
    model's (1 by definition: it is compared with itself)."""

    kind = "feature_agreement"
    needs = "an image classification task (ImageClassificationTask)"
    default_metrics = ("feature_similarity", "head_agreement")

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        from mmtune.tasks.classification import ImageClassificationTask

        return isinstance(task, ImageClassificationTask)

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: Runner) -> None:
        super().__init__(rset, task, runner)
        columns = ManifestColumns(path=rset.columns.get("path", "path"), label=rset.columns.get("label", "label"))
        samples = limited(read_image_labels(rset.path, columns), rset.limit)
        config = task.data_config
        transform = build_transform(config, False, AugmentSpec(), runner.image_size)
        dataset = ImageClassificationDataset(samples, transform, None, False, config["input_size"][0], "min_max")
        self.loader = DataLoader(dataset, batch_size=rset.batch_size, shuffle=False, num_workers=0)
        self.head = original_head(task.model_spec, task.classifier.head[0])
        self.reference: Optional[torch.Tensor] = None

    def features(self, task: nn.Module) -> torch.Tensor:
        """Pooled features of the reference images: the input of the task's classification layer, [N, D]
        (or [N, C, 1, 1] before a convolutional head)."""
        layer = task.classifier.module.get_submodule(task.classifier.head[0])
        caught: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach().float()))
        out = []
        try:
            with self.runner.scoring(task):
                for batch in self.loader:
                    caught.clear()
                    self.runner.run(lambda b: task(b["pixels"]), batch)
                    out.append(caught[0].cpu())
        finally:
            hook.remove()
        return torch.cat(out)

    def score(self, task: nn.Module) -> dict[str, float]:
        feats = self.features(task)
        if self.reference is None:
            self.reference = feats
        similarity = F.cosine_similarity(feats.flatten(1), self.reference.flatten(1), dim=1)
        values = {"feature_similarity": similarity.mean().item()}
        if self.head is not None:
            with torch.no_grad():
                before = self.head(self.reference).flatten(1).argmax(dim=1)
                after = self.head(feats).flatten(1).argmax(dim=1)
            values["head_agreement"] = (before == after).float().mean().item()
        return values

    def state(self) -> dict:
        return {"reference": self.reference}

    def load_state(self, state: dict) -> None:
        if state.get("reference") is not None:
            self.reference = state["reference"].float()


def original_head(spec: ModelSpec, head_name: str) -> Optional[nn.Module]:
    """The base model's own classification layer (float32, on CPU), or None when it has none: random
    weights (`pretrained: false`), a headless backbone (0 classes), or weights whose head size cannot be
    found; then only the feature similarity is reported."""
    from mmtune.models.vision import build_classifier

    if not (spec.pretrained or spec.checkpoint):
        log.warning("[mmtune] retention feature_agreement: %s has no pretrained weights, so no original head; "
                    "reporting feature similarity only", spec.name)
        return None
    num_classes = own_num_classes(spec)
    if not num_classes:
        log.info("[mmtune] retention feature_agreement: %s has no classification head; reporting feature "
                 "similarity only", spec.name)
        return None
    try:
        clf = build_classifier(spec, num_classes)
    except ModelError as err:
        log.warning("[mmtune] retention feature_agreement: cannot build %s with its own %d-class head (%s); "
                    "reporting feature similarity only", spec.name, num_classes, err)
        return None
    return copy.deepcopy(clf.module.get_submodule(head_name)).float().eval().cpu()


def own_num_classes(spec: ModelSpec) -> int:
    """The number of classes the base model's weights were trained with (0: a headless backbone)."""
    from mmtune.models.vision import resolve_classifier_ref

    family, ref = resolve_classifier_ref(spec)
    if family == "timm":
        import timm

        kwargs = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
        with torch.device("meta"):
            module = timm.create_model(ref, pretrained=False, **kwargs)
        return int(getattr(module, "num_classes", 0) or 0)
    import torchvision

    if Path(ref).is_dir():
        return int(json.loads((Path(ref) / "config.json").read_text()).get("num_classes") or 0)
    if spec.checkpoint:
        return _checkpoint_head_size(spec, ref)
    weights = torchvision.models.get_model_weights(ref).DEFAULT
    return len(weights.meta.get("categories") or [])


def _checkpoint_head_size(spec: ModelSpec, arch: str) -> int:
    """Rows of the last linear layer's weight in a torchvision weights file (the head it was saved with)."""
    import torchvision

    from mmtune.models.vision import _last_linear

    with torch.device("meta"):
        module = torchvision.models.get_model(arch, weights=None, **spec.kwargs)
    key = f"{_last_linear(module)}.weight"
    path = str(spec.checkpoint)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return int(f.get_slice(key).get_shape()[0]) if key in f.keys() else 0
    state = torch.load(path, map_location="meta", weights_only=True)
    for nested in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    return int(state[key].shape[0]) if key in state else 0

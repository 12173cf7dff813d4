"""The `retention:` section of a config: general-capability sets scored before and after fine-tuning
(a CLI-level section, like `evaluation:`; tasks never see it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from mmtune.data.text_reading import TextFields, TextFormat
from mmtune.errors import ConfigError

RetentionKind = Literal["text_loss", "lm_eval", "zero_shot", "retrieval", "feature_agreement"]


@dataclass
class RetentionSet:
    """One general-capability set, scored on the untuned model and on the tuned one.

    Args:
        name: the set's name in the table, in metrics.json and in logged metrics (`retention/<name>/...`).
        kind: how it is scored; each kind fits one task family:
            `text_loss` (causal LMs): per-token loss and perplexity on a text or instruction file
            (.jsonl/.json/.csv/.parquet in any format `TextData` reads);
            `lm_eval` (causal LMs): lm-evaluation-harness tasks from a task YAML file or a folder of
            them (`pip install mmtune[lmeval]`); point the YAML's `dataset_kwargs.data_files` at local
            files (`dataset_path: json`) so it runs offline;
            `zero_shot` (CLIP, SigLIP, dual encoders): zero-shot accuracy on a labeled image folder or
            manifest (`path,label`), prompts from the task's `zero_shot_template`;
            `retrieval` (aligners and text embedding models): Recall@K and MRR on image-text pairs
            (`image,text`) or, for text embedding models, query-document pairs (`query,positive`);
            `feature_agreement` (image classifiers): on a reference image folder (no labels needed),
            the cosine similarity of the tuned backbone's pooled features with the untuned one's, and
            the agreement of the pretrained model's own head (e.g. its 1000 ImageNet classes) applied
            to both.
        path: the set's file or folder (for `lm_eval`: a task YAML file or a folder of them).
        metric: the metric(s) the threshold checks; None checks the kind's headline metric(s): `loss`
            (text_loss), every reported metric (lm_eval), `zero_shot_accuracy`, `mean_recall`,
            `feature_similarity` and `head_agreement` (feature_agreement).
        max_drop: the largest allowed loss of capability, in the metric's own units and direction
            (a rise of a loss, a fall of an accuracy); None reports without checking.
        relative: `max_drop` is a fraction of the untuned score (0.05: at most 5% worse).
        action: what a larger drop does: `warn` (a warning at fit end) or `fail` (the run ends with an
            error, after checkpoints and metrics.json are written).
        limit: score only the first N rows (images, texts, documents) of the set.
        batch_size: rows per forward pass.
        format: text_loss: the file's format (`auto` detects it).
        fields: text_loss: field names, when they differ from the defaults.
        assistant_only_loss: text_loss: on conversations, the loss of the assistant replies only.
        max_length: text_loss: longer samples are truncated to this many tokens.
        tasks: lm_eval: task names to run from `path` (default: every task defined there).
        num_fewshot: lm_eval: few-shot examples (default: each task's own).
        columns: manifest column names, where they differ from the defaults (`path`, `label` for images;
            `image`, `text` for pairs; `query`, `positive` for query-document pairs).
    """

    name: str
    kind: RetentionKind
    path: str
    metric: Union[None, str, list[str]] = None
    max_drop: Optional[float] = None
    relative: bool = False
    action: Literal["warn", "fail"] = "warn"
    limit: Optional[int] = None
    batch_size: int = 16
    format: TextFormat = "auto"
    fields: TextFields = field(default_factory=TextFields)
    assistant_only_loss: bool = True
    max_length: int = 1024
    tasks: list[str] = field(default_factory=list)
    num_fewshot: Optional[int] = None
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> Optional[list[str]]:
        """The checked metric names given by the config (None: the kind's default)."""
        if self.metric is None:
            return None
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)


@dataclass
class RetentionSpec:
    """Forgetting checks of a fit (`mmtune fit` with a `retention:` section).

    Every set is scored on the untuned model before the first training step and on the tuned model at
    the end of fit; the table of before, after and change goes to the run's metrics.json (`retention`)
    and is printed.

    Args:
        sets: the general-capability sets.
        every_validation: also score every set at each validation, logged as `retention/<set>/<metric>`
            (so curves show when forgetting starts, and a monitor may watch them).
    """

    sets: list[RetentionSet] = field(default_factory=list)
    every_validation: bool = False


def as_retention_spec(raw) -> RetentionSpec:
    """The spec from the CLI's parsed value (a RetentionSpec, a Namespace or dict, or None)."""
    if raw is None:
        return RetentionSpec()
    if isinstance(raw, RetentionSpec):
        spec = raw
    else:
        raw = dict(raw)
        sets = [_as_set(s) for s in raw.get("sets") or []]
        spec = RetentionSpec(sets=sets, every_validation=bool(raw.get("every_validation", False)))
    check_spec(spec)
    return spec


def _as_set(raw) -> RetentionSet:
    if isinstance(raw, RetentionSet):
        return raw
    data = dict(raw)
    if data.get("fields") is not None and not isinstance(data["fields"], TextFields):
        data["fields"] = TextFields(**dict(data["fields"]))
    return RetentionSet(**data)


def check_spec(spec: RetentionSpec) -> None:
    """Config mistakes found before anything is built: duplicate names, bad numbers."""
    seen = set()
    for i, s in enumerate(spec.sets):
        where = f"retention.sets[{i}] ({s.name!r})"
        if not s.name or "/" in s.name:
            raise ConfigError(f"{where}: a set needs a name without '/' (it becomes retention/<name>/<metric>)")
        if s.name in seen:
            raise ConfigError(f"{where}: two retention sets are named {s.name!r}")
        seen.add(s.name)
        if not s.path:
            raise ConfigError(f"{where}: no path")
        if s.max_drop is not None and s.max_drop < 0:
            raise ConfigError(f"{where}: max_drop must be >= 0, got {s.max_drop}")
        if s.limit is not None and s.limit < 1:
            raise ConfigError(f"{where}: limit must be >= 1, got {s.limit}")
        if s.batch_size < 1:
            raise ConfigError(f"{where}: batch_size must be >= 1, got {s.batch_size}")

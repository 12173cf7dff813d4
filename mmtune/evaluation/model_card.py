"""The model card `mmtune export` writes beside an exported model (`README.md`, Hugging Face convention).

The YAML metadata (base model, library, tags, datasets, a `model-index` with the test metrics) is built
with `huggingface_hub.ModelCardData`, so the card parses with `huggingface_hub.ModelCard` and shows its
results on the Hub; the body is written from the run directory's `config.yaml` and `metrics.json`
(data, training setup, metrics with intervals, baseline, subgroups, calibration, retention, limits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from mmtune.files import read_json, write_text_atomic

# mmtune.json "task" -> (Hub pipeline tag, model-index task type, a usage snippet)
TASKS = {
    "image_classification": ("image-classification", "image-classification"),
    "vision_language": ("image-text-to-text", "image-to-text"),
    "causal_lm": ("text-generation", "text-generation"),
    "image_text_alignment": ("zero-shot-image-classification", "zero-shot-image-classification"),
}
SMALL_TEST_SET = 100  # below this many test samples, intervals are wide: said in the limitations


def _library(out: Path) -> str:
    config = read_json(out / "config.json", {}) or {}
    if "architecture" in config:
        return "timm"
    if (out / "modules.json").is_file():
        return "sentence-transformers"
    if config.get("mmtune_family") == "torchvision":
        return "pytorch"
    return "transformers"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def _metric_rows(test: dict) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
    """(name, value, ci_low, ci_high) of the overall test metrics; logged values when no intervals."""
    if test.get("intervals"):
        return [(k, v.get("value"), v.get("ci_low"), v.get("ci_high")) for k, v in test["intervals"].items()
                if "/" not in k]
    return [(k.removeprefix("test/"), v, None, None) for k, v in (test.get("metrics") or {}).items()
            if k.count("/") == 1]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _body(meta: dict, config: dict, metrics: dict, library: str, name: str) -> str:
    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    test, fit = metrics.get("test") or {}, metrics.get("fit") or {}
    parts = [f"# {name}", "",
             f"Fine-tuned from `{meta.get('source_model')}` with [mmtune](https://pypi.org/project/mmtune/) "
             f"({meta.get('task', 'unknown task').replace('_', ' ')}; library: {library})."]
    if meta.get("classes"):
        parts += ["", f"Classes ({len(meta['classes'])}): " + ", ".join(f"`{c}`" for c in meta["classes"])]
    parts += ["", "## Training data", ""]
    parts.append(f"- Source: `{data.get('path')}`" + (f" (groups kept within one split: `{data['group_column']}`)"
                                                        if data.get("group_column") else ""))
    if test.get("samples"):
        parts.append(f"- Test set: {test['samples']} samples")
    if test.get("class_counts"):
        parts.append("- Test class counts: " + ", ".join(f"{k} {v}" for k, v in test["class_counts"].items()))
    adapter, optimizer = model.get("adapter") or {}, model.get("optimizer") or {}
    parts += ["", "## Training procedure", "",
              f"- Method: {adapter.get('method', 'none')}" + (f" (r={adapter.get('r')}, alpha={adapter.get('alpha')})"
                                                              if adapter.get("method") not in (None, "none") else ""),
              f"- Optimizer: AdamW, lr {optimizer.get('lr')}, weight decay {optimizer.get('weight_decay')}, "
              f"{optimizer.get('schedule', 'cosine')} schedule",
              f"- Trainer: max_epochs {trainer.get('max_epochs')}, precision {trainer.get('precision')}, "
              f"devices {trainer.get('devices')}, strategy {trainer.get('strategy')}"]
    if fit:
        parts.append(f"- Best checkpoint by `{fit.get('monitor')}` = {_fmt(fit.get('best_score'))} at epoch "
                     f"{fit.get('best_epoch')}, step {fit.get('best_step')}")
    rows = _metric_rows(test)
    if rows:
        conf = (test.get("bootstrap") or {}).get("confidence", 0.95)
        parts += ["", "## Evaluation", "",
                  f"Test metrics with {conf:.0%} bootstrap intervals "
                  f"({(test.get('bootstrap') or {}).get('resamples', '-')} resamples over test samples):", "",
                  _table(["metric", "value", "interval"], [[n, _fmt(v), f"[{_fmt(lo)}, {_fmt(hi)}]"]
                                                           for n, v, lo, hi in rows])]
    evaluate = metrics.get("evaluate") or {}
    if evaluate.get("comparison"):
        parts += ["", f"### Against the baseline `{evaluate.get('baseline')}`", "",
                  _table(["metric", "baseline", "tuned", "difference", "interval", "verdict"],
                         [[n, _fmt(c.get("baseline")), _fmt(c.get("tuned")), _fmt(c.get("difference")),
                           f"[{_fmt(c.get('ci_low'))}, {_fmt(c.get('ci_high'))}]", c.get("verdict", "")]
                          for n, c in evaluate["comparison"].items() if "/" not in n])]
    for column, audit in (test.get("subgroups") or {}).items():
        groups = audit.get("groups") or []
        names = [n for n in (groups[0].get("metrics") or {}) if "/" not in n][:4] if groups else []
        parts += ["", f"### Subgroups by `{column}`", "",
                  _table(["group", "size", *names],
                         [[g.get("group"), str(g.get("size")) + (" (small)" if g.get("small") else ""),
                           *(_fmt((g.get("metrics") or {}).get(n, {}).get("value")) for n in names)] for g in groups])]
    calibration = metrics.get("calibration") or {}
    if calibration:
        parts += ["", "### Calibration", "",
                  f"Temperature {calibration.get('temperature')} fitted on the {calibration.get('fitted_on', 'val')} "
                  f"split (ECE {_fmt(calibration.get('ece_before'))} -> {_fmt(calibration.get('ece_after'))}); "
                  f"operating point {json.dumps(calibration.get('operating_point'))}, thresholds "
                  f"{json.dumps(calibration.get('thresholds'))}. Both are in `mmtune.json` beside the weights."]
    retention = (metrics.get("retention") or {}).get("sets") or []
    if retention:
        parts += ["", "### Retention (forgetting checks)", "",
                  _table(["set", "metric", "before", "after", "change", "status"],
                         [[r.get("name"), r.get("metric"), _fmt(r.get("before")), _fmt(r.get("after")),
                           _fmt(r.get("change")), r.get("status")] for r in retention])]
    parts += ["", "## Known limitations", "", *(f"- {line}" for line in _limitations(test, metrics))]
    return "\n".join(parts) + "\n"


def _limitations(test: dict, metrics: dict) -> list[str]:
    out = []
    n = test.get("samples")
    if not test:
        out.append("No test results were recorded for this run: the model has not been evaluated on held-out data.")
    elif n is not None and n < SMALL_TEST_SET:
        out.append(f"The test set has only {n} samples: the intervals above are wide; confirm on more data.")
    for column, audit in (test.get("subgroups") or {}).items():
        small = [str(g.get("group")) for g in audit.get("groups") or [] if g.get("small")]
        if small:
            out.append(f"Groups of `{column}` with too few test samples for firm conclusions: {', '.join(small)}.")
    if not test.get("subgroups"):
        out.append("No subgroup audit was run: performance across patient groups, sites or product lines is unknown.")
    if not (metrics.get("retention") or {}).get("sets"):
        out.append("No forgetting check was run: general capabilities of the base model may have degraded.")
    out.append("Results hold for data like the training data; a new site, scanner or product line needs its own check.")
    return out


def write_model_card(out_dir: Path, run_dir: Optional[Path], export_name: Optional[str] = None) -> Path:
    """Writes `out_dir/README.md` for an export, from `mmtune.json` in `out_dir` and the run directory
    the checkpoint came from (when known). Returns the card's path. `export_name` names the model
    when there is no run directory (default: the folder's name; exports are written in a temporary
    folder first)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    out = Path(out_dir)
    meta = read_json(out / "mmtune.json", {}) or {}
    config = {}
    if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    metrics = (read_json(Path(run_dir) / "metrics.json", {}) if run_dir is not None else {}) or {}
    pipeline, task_type = TASKS.get(meta.get("task"), (None, "other"))
    library = _library(out)
    name = Path(run_dir).parent.name if run_dir is not None else (export_name or out.name)
    data_path = ((config.get("data") or {}).get("init_args") or {}).get("path")
    dataset = Path(str(data_path)).name if data_path else "local data"
    eval_results = [EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset, dataset_split="test",
                               metric_type=n, metric_name=n, metric_value=round(v, 6))
                    for n, v, _, _ in _metric_rows(metrics.get("test") or {}) if v is not None]
    card_data = ModelCardData(base_model=meta.get("source_model"), library_name=library, pipeline_tag=pipeline,
                              tags=["mmtune", *( [meta["task"]] if meta.get("task") else [])],
                              datasets=[dataset] if data_path else None, model_name=name,
                              eval_results=eval_results or None)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{_body(meta, config, metrics, library, name)}")
    return write_text_atomic(out / "README.md", str(card))

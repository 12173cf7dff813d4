"""The report's opening: header and headline, the config summary, the data summary and the training
curves (from `config.yaml`, `metrics.json`'s `parameters` and `fit`, `data_stats.json`, the
`skipped_*.csv` files and the CSVLogger's `metrics.csv`)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from mmtune.evaluation.report import plots
from mmtune.evaluation.report.collect import RunData
from mmtune.evaluation.report.html import Raw, Section, badge, esc, facts, figure, fmt, note, table

HEADLINE_METRICS = ("accuracy", "f1_macro", "auroc_macro", "mean_recall", "vqa_acc", "rougeL", "bleu4", "loss")
SHOWN_SKIPS = 25


def _init(node: Any) -> dict:
    """A config node's arguments (`init_args` of a class_path node, or the node itself)."""
    if not isinstance(node, dict):
        return {}
    return node.get("init_args") if isinstance(node.get("init_args"), dict) else node


def _short(class_path: Any) -> Optional[str]:
    return str(class_path).rsplit(".", 1)[-1] if class_path else None


def overall(values: dict) -> dict:
    """Overall metrics (no per-class `name/class` entries), the usual headline ones first."""
    plain = {k: v for k, v in values.items() if "/" not in k}
    first = [k for k in HEADLINE_METRICS if k in plain]
    return {k: plain[k] for k in first + [k for k in plain if k not in first]}


def headline(run: RunData) -> str:
    """One sentence a reader gets before anything else."""
    parts = []
    comparison = (run.comparison or {}).get("comparison") or {}
    if comparison:
        rows = overall(comparison)
        verdicts = Counter(c.get("verdict") for c in rows.values())
        text = f"tuned beats baseline ({_short_path((run.comparison or {}).get('baseline'))}) on {verdicts['better']} of {len(rows)} metrics"
        if verdicts["worse"]:
            text += f", worse on {verdicts['worse']}"
        parts.append(text)
    intervals = run.test.get("intervals") or {}
    first = next(iter(overall(intervals).items()), None)
    if first:
        name, iv = first
        conf = (run.test.get("bootstrap") or {}).get("confidence", 0.95)
        parts.append(f"test {name} {fmt(iv.get('value'), 3)} ({conf:.0%} CI {fmt(iv.get('ci_low'), 3)}–"
                     f"{fmt(iv.get('ci_high'), 3)}) on {fmt(run.test.get('samples'))} samples")
    elif run.test.get("metrics"):
        name, value = next(iter(run.test["metrics"].items()))
        parts.append(f"{name} {fmt(value, 3)}")
    retention = (run.metrics.get("retention") or {}).get("sets") or []
    if retention:
        flagged = Counter(r.get("status") for r in retention)
        bad = [f"{flagged[s]} {s}" for s in ("fail", "warn") if flagged[s]]
        parts.append("retention: " + (", ".join(bad) if bad else f"all {len(retention)} checks within threshold"))
    if not parts:
        return "No test results yet: this report shows what the run has recorded so far."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def _short_path(name: Any) -> str:
    """A checkpoint inside a run directory as `<run>/version_N/best.ckpt`; other names as they are."""
    path = Path(str(name))
    if path.parent.name == "checkpoints" and len(path.parts) >= 4:
        return f"{path.parent.parent.parent.name}/{path.parent.parent.name}/{path.name}"
    return str(name)


def header(run: RunData) -> str:
    model = _init(_init((run.config or {}).get("model")).get("model"))
    checkpoint = run.test.get("ckpt_path") or (run.records.info.get("ckpt_path") if run.records else None) \
        or run.fit.get("best_model_path")
    stamp = _finished(run.run_dir)
    chips = [("task", _short(((run.config or {}).get("model") or {}).get("class_path"))),
             ("model", model.get("name")), ("checkpoint", Path(checkpoint).name if checkpoint else None),
             ("run finished", stamp)]
    chip_html = "".join(f'<span class="chip">{esc(k)}: {esc(v)}</span>' for k, v in chips if v)
    return (f'<header class="top"><h1>{esc(run.name)}</h1><div class="sub">{esc(run.run_dir)}</div>'
            f'<div class="headline">{esc(headline(run))}</div><div class="chips">{chip_html}</div>'
            f"{_tiles(run)}</header>")


def _tiles(run: RunData, limit: int = 4) -> str:
    """The headline metrics as tiles: value, interval and, after `evaluate`, the change against the
    baseline coloured by its verdict."""
    intervals = overall(run.test.get("intervals") or {})
    comparison = (run.comparison or {}).get("comparison") or {}
    conf = (run.test.get("bootstrap") or {}).get("confidence", 0.95)
    tiles = []
    for name, iv in list(intervals.items())[:limit]:
        c = comparison.get(name) or {}
        change = ""
        if c.get("difference") is not None:
            tone = {"better": "good", "worse": "bad"}.get(c.get("verdict"), "neutral")
            change = (f'<div class="delta {tone}">{c["difference"]:+.3f} vs baseline · {esc(c.get("verdict"))}</div>')
        ci = (f"{fmt(iv.get('ci_low'), 3)}–{fmt(iv.get('ci_high'), 3)}" if iv.get("ci_low") is not None else "no interval")
        tiles.append(f'<div class="tile"><div class="name">{esc(name)}</div><div class="value">{fmt(iv.get("value"), 3)}'
                     f'</div><div class="ci">{conf:.0%} CI {ci}</div>{change}</div>')
    return f'<div class="tiles">{"".join(tiles)}</div>' if tiles else ""


def _finished(run_dir: Path) -> Optional[str]:
    times = [p.stat().st_mtime for p in (run_dir / "metrics.json", run_dir / "metrics.csv") if p.is_file()]
    return dt.datetime.fromtimestamp(max(times)).strftime("%Y-%m-%d %H:%M") if times else None


def _adapter(adapter: dict) -> Optional[str]:
    method = adapter.get("method")
    if not method:
        return None
    if method == "none":
        return "none (full fine-tune)"
    details = ", ".join(f"{k} {adapter[k]}" for k in ("r", "alpha", "dropout") if adapter.get(k) not in (None, ""))
    parts = adapter.get("parts") or {}
    where = ", ".join(f"{k}: {v}" for k, v in parts.items()) if isinstance(parts, dict) else ""
    return method + (f" ({details})" if details else "") + (f"; parts {where}" if where else "")


def config_section(run: RunData) -> Section:
    section = Section("config", "Configuration")
    if run.config is None:
        section.missing = "config.yaml (LightningCLI saves it when a verb runs in this directory)"
        return section
    cfg = run.config
    task = _init(cfg.get("model"))
    model, adapter, optimizer = _init(task.get("model")), _init(task.get("adapter")), _init(task.get("optimizer"))
    data, trainer = _init(cfg.get("data")), cfg.get("trainer") or {}
    params = run.metrics.get("parameters") or {}
    trainable = (f"{fmt(params.get('trainable'))} of {fmt(params.get('total'))} "
                 f"({params['trainable'] / params['total']:.2%})" if params.get("total") else None)
    monitor = task.get("monitor")
    monitor = (f"{monitor.get('metric')} ({monitor.get('mode')})" if isinstance(monitor, dict) else monitor)
    opt = ", ".join(f"{k} {optimizer[k]}" for k in ("lr", "weight_decay", "warmup", "schedule", "vision_lr",
                                                     "layer_decay") if optimizer.get(k) not in (None, ""))
    model_facts = [("task", _short((cfg.get("model") or {}).get("class_path"))), ("model", model.get("name")),
                   ("pretrained", model.get("pretrained")), ("adapter", _adapter(adapter)),
                   ("trainable parameters", trainable), ("calibration", task.get("calibration")),
                   ("operating point", task.get("operating_point")), ("classes", _classes(task, run))]
    train_facts = [("optimizer", opt), ("monitor", monitor), ("max epochs", trainer.get("max_epochs")),
                   ("max steps", trainer.get("max_steps") if trainer.get("max_steps") not in (None, -1) else None),
                   ("precision", trainer.get("precision")), ("accelerator", trainer.get("accelerator")),
                   ("devices", trainer.get("devices")), ("strategy", trainer.get("strategy")),
                   ("gradient accumulation", trainer.get("accumulate_grad_batches")
                    if trainer.get("accumulate_grad_batches") not in (None, 1) else None),
                   ("seed", cfg.get("seed_everything"))]
    data_facts = [("data", _short((cfg.get("data") or {}).get("class_path")))]
    data_facts += [(k.replace("_", " "), data.get(k)) for k in ("path", "val_path", "test_path", "predict_path",
                                                               "group_column", "image_size", "batch_size",
                                                               "max_length", "split_ratios")]
    evaluation = cfg.get("evaluation") or {}
    retention = [s.get("name") for s in ((cfg.get("retention") or {}).get("sets") or []) if isinstance(s, dict)]
    bootstrap = evaluation.get("bootstrap") or {}
    eval_facts = [("subgroups", ", ".join(evaluation.get("subgroups") or []) or None),
                  ("min group size", evaluation.get("min_group_size") if evaluation.get("subgroups") else None),
                  ("bootstrap", f"{bootstrap.get('resamples')} resamples, {bootstrap.get('confidence')} confidence, "
                                f"seed {bootstrap.get('seed')}" if bootstrap else None),
                  ("retention sets", ", ".join(map(str, retention)) or None)]
    cards = [("Model", model_facts), ("Training", train_facts), ("Data", data_facts), ("Evaluation", eval_facts)]
    section.body = '<div class="cards">' + "".join(f"<div><h3>{t}</h3>{facts(f) or note('nothing configured')}</div>"
                                                  for t, f in cards) + "</div>"
    return section


def _classes(task: dict, run: RunData) -> Optional[str]:
    classes = task.get("classes") or (run.records.info.get("classes") if run.records else None)
    if not classes or not isinstance(classes, list):
        return None
    shown = ", ".join(map(str, classes[:12]))
    return f"{len(classes)}: {shown}" + (" …" if len(classes) > 12 else "")


def data_section(run: RunData) -> Section:
    section = Section("data", "Data")
    parts, stats = [], run.data_stats if isinstance(run.data_stats, dict) else {}
    splits = stats.get("splits") if isinstance(stats.get("splits"), dict) else None
    if splits is None and isinstance(stats.get("samples"), dict):
        splits = {k: {"samples": v} for k, v in stats["samples"].items()}
    if splits:
        columns = list(dict.fromkeys(k for v in splits.values() if isinstance(v, dict) for k in v))
        if columns == ["samples"]:  # sizes only: one line (the class balance below has the rest)
            sizes = " · ".join(f"{name} {fmt((v or {}).get('samples'))}" for name, v in splits.items())
            parts.append(facts([("split sizes", sizes)]))
        else:
            rows = [[name, *(fmt((v or {}).get(c)) for c in columns)] for name, v in splits.items()]
            parts.append("<h3>Split sizes</h3>" + table(["split", *columns], rows, numeric=range(1, len(columns) + 1)))
    how = stats.get("split") if isinstance(stats.get("split"), dict) else {}
    if how.get("shares"):
        kind = ("stratified by label" if how.get("stratified") else "not stratified") + (
            f", groups of {how['grouped_by']!r} kept whole" if how.get("grouped_by") else "")
        parts.append(facts([("split", f"{' / '.join(fmt(x) for x in how['shares'])} ({kind}, seed {fmt(how.get('seed'))})")]))
    for line in stats.get("warnings") or []:
        parts.append(note(str(line), "warn"))
    counts_by_split = dict(stats.get("class_counts") or {}) if isinstance(stats.get("class_counts"), dict) else {}
    if run.test.get("class_counts") and "test" not in counts_by_split:
        counts_by_split["test"] = run.test["class_counts"]
    if counts_by_split:
        parts.append("<h3>Class balance</h3>" + _balance(counts_by_split))
    elif run.test.get("samples") is not None:
        parts.append(facts([("test samples", fmt(run.test.get("samples")))]))
    skipped_total = sum(len(s.rows) for s in run.skipped)
    if isinstance(stats.get("skipped"), int) and not run.skipped:
        skipped_total = stats["skipped"]
    parts.append("<h3>Skipped rows</h3>" + (_skipped(run) if run.skipped else
                                             note(f"{skipped_total} rows skipped." if skipped_total else
                                                  "No rows were skipped (no skipped_*.csv in the run directory).")))
    if not splits and not counts_by_split:
        section.missing = ("split sizes and class balance (no data_stats.json, and no test entry in metrics.json "
                           "yet: run `mmtune test`)")
    section.body = "".join(parts)
    return section


def _balance(counts_by_split: dict) -> str:
    classes = list(dict.fromkeys(c for counts in counts_by_split.values() for c in counts))
    header, rows = ["class"], []
    for split in counts_by_split:
        header += [split, "share"]
    for c in classes:
        row: list = [c]
        for split, counts in counts_by_split.items():
            total = sum(counts.values()) or 1
            share = counts.get(c, 0) / total
            row += [fmt(counts.get(c, 0)), Raw(f'<span class="bar" style="width:{60 * share:.0f}px"></span> {share:.1%}')]
        rows.append(row)
    rows.append(["total", *[x for counts in counts_by_split.values() for x in (fmt(sum(counts.values())), "")]])
    return table(header, rows, numeric=range(1, len(header)))


def _skipped(run: RunData) -> str:
    out = []
    for s in run.skipped:
        reasons = Counter(reason for _, reason in s.rows)
        out.append(note(f"{len(s.rows)} row(s) skipped, listed in {s.file}.", "warn"))
        out.append(table(["reason", "rows"], [[r, fmt(n)] for r, n in reasons.most_common()], numeric=[1]))
        shown = [[key, reason] for key, reason in s.rows[:SHOWN_SKIPS]]
        more = f" (first {SHOWN_SKIPS} of {len(s.rows)})" if len(s.rows) > SHOWN_SKIPS else ""
        out.append(f"<details><summary>the skipped rows{more}</summary>{table([s.key, 'reason'], shown)}</details>")
    return "".join(out)


def training_section(run: RunData) -> Section:
    section = Section("training", "Training")
    fit = run.fit
    parts = []
    if fit:
        flag = badge("interrupted") if fit.get("interrupted") else ""
        parts.append(facts([("best checkpoint", Path(fit["best_model_path"]).name if fit.get("best_model_path") else None),
                            ("monitor", fit.get("monitor")), ("best score", fmt(fit.get("best_score"))),
                            ("best epoch / step", f"{fit.get('best_epoch')} / {fit.get('best_step')}"
                             if fit.get("best_epoch") is not None else None),
                            ("epochs / steps run", f"{fit.get('epochs')} / {fit.get('global_step')}"
                             if fit.get("epochs") is not None else None),
                            ("wall time", _duration(fit.get("wall_time_s"))),
                            ("status", Raw(flag + " " + esc(fit.get("error", ""))) if flag else None)]))
    keys = list(dict.fromkeys(k for row in run.curves for k in row if k not in ("epoch", "step")))
    losses = [k for k in keys if k.endswith("/loss") or (k.startswith("train/") and "/" not in k[6:])]
    # A loss of a single term logs it twice (train/ce and train/loss): draw it once.
    losses = [k for k in losses if k == "train/loss" or _points(run.curves, k) != _points(run.curves, "train/loss")]
    scores = [k for k in keys if k.startswith("val/") and "/" not in k[4:] and k not in losses
              and not k.endswith(("perplexity", "temperature"))][:8]
    if losses or scores:
        best = _logged_step(run.curves, fit)
        parts.append(figure(plots.training_curves(run.curves, losses[:6], scores, best),
                            "training curves", "From metrics.csv (CSVLogger): losses by optimizer step, left; "
                            "validation scores at each validation, right."))
    gaps = []
    if not run.curves:
        gaps.append("training curves (no metrics.csv: the fit ran elsewhere or logged nothing)")
    elif not (losses or scores):
        gaps.append("loss or validation curves (metrics.csv has no loss or val/ column)")
    if not fit:
        gaps.append("the fit's summary (no fit entry in metrics.json: this directory did not train, or the "
                    "file was damaged)")
    if len(gaps) == 2 or (gaps and not parts):
        section.missing = "; ".join(gaps)
    elif gaps:
        parts.insert(0, note(f"Not recorded for this run: {gaps[0]}."))
    section.body = "".join(parts)
    return section


def _points(curves: list[dict], key: str) -> list[tuple]:
    return [(row.get("step"), row[key]) for row in curves if key in row]


def _logged_step(curves: list[dict], fit: dict):
    """Where the best checkpoint sits on the curves' step axis: the validation row of its epoch whose
    monitored value is the best score (Lightning logs a validation at the step before the
    checkpoint's global step, so `best_step` itself is one step off)."""
    monitor, epoch, best = fit.get("monitor"), fit.get("best_epoch"), fit.get("best_score")
    rows = [r for r in curves if r.get("epoch") == epoch and monitor in r and "step" in r]
    if not rows:
        return fit.get("best_step")
    if isinstance(best, (int, float)):
        rows.sort(key=lambda r: abs(r[monitor] - best))
    return rows[0]["step"]


def _duration(seconds: Any) -> Optional[str]:
    if not isinstance(seconds, (int, float)):
        return None
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else (f"{m} min {s} s" if m else f"{seconds:.1f} s")

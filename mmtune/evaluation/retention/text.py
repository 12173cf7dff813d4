"""Retention of causal language models: per-token loss on a general text or instruction set
(`text_loss`), and lm-evaluation-harness tasks on local data (`lm_eval`)."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator

from torch import nn

from mmtune.data.text_batches import Collator
from mmtune.data.text_reading import PlainText, TextSource, read_source
from mmtune.data.text_tokens import IGNORE, Tokenized, tokenize_conversation, tokenize_text
from mmtune.errors import ConfigError
from mmtune.evaluation.retention.scorers import SCORERS, Runner, Scorer, chunks, limited
from mmtune.evaluation.retention.spec import RetentionSet
from mmtune.losses.tokens import token_loss

CAUSAL_LM = "a causal language model task (CausalLMTask, DPOTask)"


def _is_causal_lm(task: nn.Module) -> bool:
    from mmtune.tasks.sft import CausalLMTask

    return isinstance(task, CausalLMTask)


@SCORERS.register("text_loss")
class TextLossScorer(Scorer):
    """Per-token loss (and perplexity) of the model on a text or instruction file, read and tokenized
    the way `TextData` does it (same formats and chat template), unpacked so the loss is exact."""

    kind = "text_loss"
    needs = CAUSAL_LM
    default_metrics = ("loss",)
    lower_is_better = ("loss", "perplexity")

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        return _is_causal_lm(task)

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: Runner) -> None:
        super().__init__(rset, task, runner)
        samples = limited(read_source(TextSource(rset.path, rset.format, 1.0, rset.fields)), rset.limit)
        tokenizer = task.tokenizer
        items: list[Tokenized] = []
        for sample in samples:
            if isinstance(sample, PlainText):
                item = tokenize_text(tokenizer, sample)
            else:
                item = tokenize_conversation(tokenizer, sample, rset.assistant_only_loss)
            item = Tokenized(item.input_ids[:rset.max_length], item.labels[:rset.max_length], item.origin, item.meta)
            if any(label != IGNORE for label in item.labels[1:]):
                items.append(item)
        if not items:
            raise self.fail(f"none of its {len(samples)} rows has a token to score (within max_length={rset.max_length})")
        self.items = items
        self.collate = Collator(tokenizer.pad_token_id)

    def score(self, task: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        with self.runner.scoring(task):
            for part in chunks(self.items, self.rset.batch_size):
                batch = self.collate([[item] for item in part])
                t, c = self.runner.run(lambda b: token_loss(task(b), b["labels"]), batch)
                total, count = total + float(t), count + int(c)
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@SCORERS.register("lm_eval")
class LMEvalScorer(Scorer):
    """lm-evaluation-harness tasks (multiple choice, loglikelihood, generation) scored on the in-memory
    model through lm-eval's `HFLM(pretrained=model, tokenizer=tokenizer)`.

    The task files are lm-eval's own YAML; with `dataset_path: json` (or csv, parquet) and
    `dataset_kwargs: {data_files: ...}` they read local files, so the check runs offline. Relative
    data files resolve against the working directory, as in lm-eval.
    """

    kind = "lm_eval"
    needs = CAUSAL_LM

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        return _is_causal_lm(task)

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: Runner) -> None:
        super().__init__(rset, task, runner)
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError(f"retention set {rset.name!r}: kind lm_eval needs the lm-eval package "
                              "(pip install 'mmtune[lmeval]')") from None
        path = Path(rset.path).expanduser()
        with _quiet_lm_eval():
            self.manager = TaskManager(include_path=str(path if path.is_dir() else path.parent), include_defaults=False)
        index = self.manager.task_index
        if path.is_dir():
            here = [name for name, e in index.items() if e.yaml_path is not None and e.cfg and "task" in e.cfg
                    and isinstance(e.cfg["task"], str)]
        else:
            here = [name for name, e in index.items() if e.yaml_path is not None and Path(e.yaml_path).resolve() == path.resolve()]
        if not here:
            raise self.fail("no lm-eval task is defined there (a YAML file with a `task:` name)")
        if rset.tasks:
            unknown = [t for t in rset.tasks if t not in index]
            if unknown:
                raise ConfigError(f"retention set {rset.name!r}: unknown lm-eval task(s) {unknown}; {path} defines "
                                  f"{sorted(here)}")
            self.tasks = list(rset.tasks)
        else:
            self.tasks = sorted(here)
        for name in self.tasks:
            entry = index[name]
            if entry.cfg:
                self._check_data_files(name, entry.cfg, entry.yaml_path)
        self.higher: dict[str, bool] = {}

    def _check_data_files(self, name: str, cfg: dict, yaml_path) -> None:
        """Local data files named by a task must exist and hold something (the set would be empty)."""
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if files is None:
            return
        values = files.values() if isinstance(files, dict) else [files]
        for value in values:
            for f in [value] if isinstance(value, str) else list(value):
                if "://" in str(f) or any(ch in str(f) for ch in "*?["):
                    continue  # remote or a glob: left to datasets
                p = Path(f).expanduser()
                if not p.is_file():
                    hint = (f" (it exists next to the task file; lm-eval reads data files relative to the working "
                            f"directory: give {Path(yaml_path).parent / f})") if yaml_path and (Path(yaml_path).parent / f).is_file() else ""
                    raise self.fail(f"task {name}: data file {f} not found{hint}")
                if p.stat().st_size == 0:
                    raise self.fail(f"task {name}: data file {f} is empty")

    def score(self, task: nn.Module) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        with self.runner.scoring(task), _quiet_lm_eval():
            lm = HFLM(pretrained=task.net, tokenizer=task.tokenizer, batch_size=self.rset.batch_size)
            with self.runner.context():
                out = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), task_manager=self.manager,
                                              num_fewshot=self.rset.num_fewshot, limit=self.rset.limit,
                                              bootstrap_iters=0, log_samples=False)
        values: dict[str, float] = {}
        for name, results in (out or {}).get("results", {}).items():
            higher = out.get("higher_is_better", {}).get(name, {})
            for key, value in results.items():
                metric, _, filt = key.partition(",")
                if not filt or "stderr" in metric or not isinstance(value, (int, float)):
                    continue
                label = f"{name}/{metric}" + ("" if filt == "none" else f"[{filt}]")
                values[label] = float(value)
                self.higher[label] = bool(higher.get(metric, True))
        if not values:
            raise self.fail(f"lm-eval returned no metrics for {self.tasks}")
        return values

    def higher_is_better(self, metric: str) -> bool:
        return self.higher.get(metric, True)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every request batch and warns that an in-memory model is passed; keep errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

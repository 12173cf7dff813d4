"""The Lightning verbs of `mmtune` (fit, validate, test, predict) and `evaluate` (tuned against a
baseline), behind the light dispatcher `mmtune.entry` (which also runs `export`, `report`, `data align`).

The YAML maps onto the `__init__` signatures of a task and a data module (jsonargparse), so
`--print_config`, dotted overrides and type checks come from LightningCLI. What is added here:
a run directory per run (`runs/<name>/version_N/`) with CSV and TensorBoard logs that nothing writes
into before the verb's setup has passed (`mmtune.run_directory`), resuming with `--ckpt_path last`
(appending to the run's logs), `best`/`last` aliases for evaluation, the class list of a checkpoint carried
into the task before it is built, and checkpoints read with `weights_only=True` only (a checkpoint is
data: loading one never runs code from it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import mmtune
from mmtune.cli_errors import one_line, parser_keys, with_list_brackets
from mmtune.errors import ConfigError
from mmtune.evaluation.retention.spec import RetentionSpec, as_retention_spec
from mmtune.evaluation.spec import EvaluationSpec
from mmtune.faults import FaultSpec, fault_callbacks, slurm_requeued
from mmtune.models.hub import names_hub_models, offline_unless_reachable
from mmtune.progress import progress_bar
from mmtune.quiet import is_verbose, quiet_terminal
from mmtune.run_summary import RunSummary
from mmtune.run_directory import RunConfigCallback, allow_mlflow_file_store, run_loggers
from mmtune.tasks.common import read_checkpoint

log = logging.getLogger("mmtune")
mmtune.import_public_api()  # Lightning's short class_path names and the task registry need every class

RUN_DIR_ENV = "MMTUNE_RUN_DIR"  # rank 0 passes its run directory to the processes it launches
DEFAULT_MAX_EPOCHS = 20  # when neither trainer.max_epochs nor trainer.max_steps is set
CKPT_ALIASES = {"last": "last.ckpt", "best": "best.ckpt"}
CKPT_PATH_HELP = {
    "fit": "Resume a fit. `last`: the newest runs_dir/run_name/version_*/checkpoints/last.ckpt, resumed in "
           "its own run folder (logs appended); `best`: that run's best.ckpt; a file: restored from it (a "
           "new version_N unless it is this run name's own checkpoint). Read with weights_only=True.",
    "score": "The checkpoint to score. `best` / `last`: best.ckpt / last.ckpt of the newest "
             "runs_dir/run_name/version_* that has one (outputs go into that run folder); or a .ckpt file "
             "(outputs beside it when it sits in a run's checkpoints/). Read with weights_only=True.",
}


def _versions(base: Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name)))


def _is_child_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("RANK", "0")) > 0


class _BracketedRetry(Exception):
    def __init__(self, argv: list[str]) -> None:
        super().__init__("retry")
        self.argv = argv


class MMTuneArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line naming the key (and the nearest real key for a
    misspelled one) instead of the usage and jsonargparse's tree of union alternatives; `--help` still
    prints the usage. The line is raised as a ConfigError, which `mmtune.entry.main` prints (exit 2)."""

    _argv: Optional[list[str]] = None

    def parse_args(self, args=None, *rest, **kwargs):
        """Parses; a bare comma list given to a list or tuple flag (`--split 0.6,0.1,0.3`) is read as
        `[0.6,0.1,0.3]` (`cli_errors.with_list_brackets`)."""
        if args is not None and not isinstance(args, (list, tuple)):
            return super().parse_args(args, *rest, **kwargs)
        self._argv = list(sys.argv[1:] if args is None else args)
        for _ in range(len(self._argv) + 1):
            try:
                return super().parse_args(self._argv, *rest, **kwargs)
            except _BracketedRetry as retry:
                self._argv = retry.argv
        return super().parse_args(self._argv, *rest, **kwargs)

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error:  # a parser jsonargparse builds inside (a class_path's, a union's try)
            return super().error(message, ex)
        retry = with_list_brackets(message, self._argv) if self._argv is not None else None
        if retry is not None:
            raise _BracketedRetry(retry)
        parsers = [self, *getattr(self._subcommands_action, "_name_parser_map", {}).values()]
        if getattr(ex, "subcommand_parser", None) is not None:
            parsers.insert(0, ex.subcommand_parser)
        known = [key for parser in parsers for key in parser_keys(parser)]
        raise ConfigError(one_line(message, known)) from None


class MMTuneCLI(LightningCLI):
    """LightningCLI with mmtune's run directories and checkpoint handling."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's verbs without their `weights_only` option (mmtune always loads with
        `weights_only=True`, `_prepare_subcommand_kwargs`, so there is nothing to choose), plus `evaluate`."""
        verbs = {verb: skipped | {"weights_only"} for verb, skipped in LightningCLI.subcommands().items()}
        return {**verbs, "evaluate": {"model", "dataloaders", "datamodule"}}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # Lightning's own default (None) defers to torch, whose default an environment variable
        # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn off; an explicit True cannot be. (`evaluate`
        # passes it to its own test calls.)
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        return kwargs if subcommand == "evaluate" else {**kwargs, "weights_only": True}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="Run name (default: the last --config file's name); runs go to runs_dir/run_name/version_N")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Root folder of all runs")
        parser.add_dataclass_arguments(EvaluationSpec, "evaluation")
        parser.add_dataclass_arguments(RetentionSpec, "retention")
        parser.add_dataclass_arguments(FaultSpec, "faults")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            if action.dest == "ckpt_path":  # Lightning's text describes its own keywords, not mmtune's
                action.help = CKPT_PATH_HELP["fit" if subcommand == "fit" else "score"]
        return parser

    def _add_subcommands(self, parser, **kwargs) -> None:
        """LightningCLI's subcommands, plus `evaluate`, whose arguments come from `MMTuneCLI.evaluate`
        (LightningCLI takes every verb's arguments from a Trainer method of the same name)."""
        from lightning.pytorch.cli import _get_short_description

        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            klass = type(self) if name == "evaluate" else self.trainer_class
            description = _get_short_description(getattr(klass, name))
            sub = self._prepare_subcommand_parser(klass, name, **{"description": description, **kwargs.get(name, {})})
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "evaluate":  # LightningCLI looks the verb up on the Trainer first
            self.evaluate(**self._prepare_subcommand_kwargs(subcommand))
            return
        super()._run_subcommand(subcommand)

    def evaluate(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None,
                 ckpt_path: Optional[str] = None, baseline: Optional[str] = None) -> None:
        """Score the tuned model and a baseline on the same test set, with paired bootstrap intervals.

        Args:
            model: the tuned task (built from the config).
            datamodule: the test data.
            ckpt_path: the tuned checkpoint (`best`, `last` or a file).
            baseline: `base` (the untuned model), another checkpoint, or an `mmtune export` folder; None
                scores the tuned model alone, with intervals.
        """
        from mmtune.evaluation.baseline import build_baseline
        from mmtune.evaluation.run import compare_records, comparison_table, headline

        spec = self._evaluation_spec()
        base_records = None
        if baseline:
            # The baseline goes first, so the run directory's test outputs (metrics.json's test entry,
            # confusion matrix, predictions, records) are the tuned model's.
            base_task = build_baseline(model, baseline)
            self.trainer.test(base_task, datamodule=datamodule, verbose=False, weights_only=True)
            base_records = base_task.records["test"]
        self.trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        self._summarize("test")
        if base_records is not None:
            result = compare_records(self.run_dir, model.records["test"], base_records, baseline, spec)
            print(f"[mmtune] tuned ({ckpt_path}) against baseline ({baseline}), {len(base_records)} test samples, "
                  f"paired bootstrap of {spec.bootstrap.resamples} resamples:")
            print(comparison_table(headline(result, limit=20), spec.bootstrap.confidence))
        self._report()

    def _evaluation_spec(self) -> EvaluationSpec:
        from mmtune.evaluation.bootstrap import BootstrapSpec
        from mmtune.specs import as_spec

        raw = self._get(self.config_init, "evaluation")
        if isinstance(raw, EvaluationSpec):
            return raw
        raw = dict(raw or {})
        raw["bootstrap"] = as_spec(BootstrapSpec, raw.get("bootstrap"))
        return EvaluationSpec(**raw)

    def _fault_spec(self) -> FaultSpec:
        raw = self._get(self.config_init, "faults")
        return raw if isinstance(raw, FaultSpec) else FaultSpec(**dict(raw or {}))

    def _summarize(self, stage: str) -> None:
        """Intervals for the test metrics and subgroup audits (into metrics.json), printed as tables;
        rank 0 only."""
        from mmtune.evaluation.bootstrap import Interval
        from mmtune.evaluation.run import headline, interval_table, summarize_test

        records = getattr(self.model, "records", {}).get(stage)
        if records is None or not self.trainer.is_global_zero:
            return
        spec = self._evaluation_spec()
        if len(records) < 2:
            print(f"[mmtune] {len(records)} test sample(s): no bootstrap intervals")
            return
        entry = summarize_test(self.run_dir, records, spec)
        values = {k: Interval(**v) for k, v in entry["intervals"].items()}
        print(f"[mmtune] {len(records)} test samples; {spec.bootstrap.confidence:.0%} bootstrap intervals "
              f"({spec.bootstrap.resamples} resamples, seed {spec.bootstrap.seed}):")
        print(interval_table(headline(values), spec.bootstrap.confidence))
        if entry.get("subgroups"):
            from mmtune.evaluation.subgroups import subgroup_table

            for column, audit in entry["subgroups"].items():
                print(subgroup_table(column, audit))

    def after_test(self) -> None:
        self._summarize("test")
        self._report()

    def _report(self) -> None:
        """Writes the run report (`evaluation.report`, on by default) from rank 0, after the results.

        A report failure is a warning, never an error: metrics.json and the records are already on
        disk when it runs, and a plotting problem must not turn a finished test into a failed command
        (`mmtune report RUN_DIR` writes it again from those files)."""
        if not self.trainer.is_global_zero or not self._evaluation_spec().report:
            return
        from mmtune.evaluation.report import write_report

        try:
            print(f"[mmtune] report: {write_report(self.run_dir)}")
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("[mmtune] the run report was not written (%s: %s); the test results are in %s/metrics.json; "
                        "retry with `mmtune report %s`", type(err).__name__, err, self.run_dir, self.run_dir)

    def _parse_ckpt_path(self) -> None:
        """Disables LightningCLI's merge of checkpoint hyperparameters into the config.

        It would replace the configured model with the checkpoint's silently; mmtune instead takes
        only the class list from the checkpoint (`_carry_checkpoint_hparams`) and refuses weights that
        do not fit the configured model, with a message saying so.
        """

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else "run"
        base = Path(cfg.get("runs_dir") or "runs") / name
        ckpt = cfg.get("ckpt_path")
        if not ckpt and self.subcommand == "fit" and slurm_requeued() and any(
                (base / f"version_{v}" / "checkpoints" / "last.ckpt").is_file() for v in _versions(base)):
            # the same command again after a requeue: go on from the checkpoint saved on SIGTERM
            ckpt = cfg.ckpt_path = "last"
        run_dir: Optional[Path] = None
        if ckpt in CKPT_ALIASES:
            found = [base / f"version_{v}" for v in reversed(_versions(base))
                     if (base / f"version_{v}" / "checkpoints" / CKPT_ALIASES[ckpt]).is_file()]
            if not found:
                raise ConfigError(f"--ckpt_path {ckpt}: no {CKPT_ALIASES[ckpt]} under {base}/version_*/checkpoints")
            run_dir = found[0]
            cfg.ckpt_path = str(run_dir / "checkpoints" / CKPT_ALIASES[ckpt])
        elif ckpt:
            path = Path(ckpt)
            if not path.is_file():
                raise ConfigError(f"--ckpt_path {ckpt}: file not found")
            # Evaluation verbs write their outputs beside the checkpoint they score. A fit resumes a
            # run in place only when the checkpoint is one of this run name's; a fit from another
            # run's checkpoint (or a copied file) is a new run, restored from that training state.
            if path.parent.name == "checkpoints" and (
                    self.subcommand != "fit" or path.parent.parent.parent.resolve() == base.resolve()):
                run_dir = path.parent.parent
        if _is_child_process() and os.environ.get(RUN_DIR_ENV):
            run_dir = Path(os.environ[RUN_DIR_ENV])
        if run_dir is None:
            run_dir = base / f"version_{(_versions(base) or [-1])[-1] + 1}"
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.run_dir = run_dir
        trainer = cfg.get("trainer")
        if trainer is not None and trainer.get("max_epochs") is None:
            # mmtune's default, written into the saved config.yaml; a max_steps alone ends the fit by steps
            trainer.max_epochs = -1 if (trainer.get("max_steps") or -1) > 0 else DEFAULT_MAX_EPOCHS
        allow_mlflow_file_store(trainer)
        if names_hub_models(cfg):  # one connection attempt, then offline: no retry loop before the error
            offline_unless_reachable()
        self._resume_step: Optional[int] = None  # the global step a fit resumes its own run from
        if cfg.ckpt_path:
            # Read safely before anything is built, so a refused file gets a one-line error naming it
            # (Lightning reads it again, also with weights_only=True, when the verb runs).
            checkpoint = read_checkpoint(cfg.ckpt_path)
            self._carry_checkpoint_hparams(cfg, checkpoint)
            if self.subcommand == "fit" and Path(cfg.ckpt_path).parent.parent == run_dir:
                self._resume_step = int(checkpoint.get("global_step") or 0)

    def _config_filename(self) -> str:
        """`config.yaml` is the fit's that started the run; a resume and every other verb write their
        own beside it (`resume_config.yaml`, `test_config.yaml`, ...), so none replaces it."""
        if self.subcommand == "fit":
            return "config.yaml" if self._resume_step is None else "resume_config.yaml"
        return f"{self.subcommand}_config.yaml"

    def _carry_checkpoint_hparams(self, cfg, checkpoint: dict) -> None:
        """A checkpoint's class list (and label mode) is known before the task is built."""
        init = cfg.model.get("init_args") if hasattr(cfg.model, "get") else None
        if init is None or "classes" not in init:
            return
        saved = checkpoint.get("hyper_parameters") or {}
        for key in ("classes", "multi_label", "class_weights"):
            if saved.get(key) is not None and init.get(key) in (None, "balanced"):
                init[key] = saved[key]

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        run_dir = self.run_dir
        kwargs["logger"] = run_loggers(trainer_cfg.get("logger"), run_dir, self.subcommand == "fit", self._resume_step)
        if trainer_cfg.get("default_root_dir") in (None, os.getcwd()):
            kwargs["default_root_dir"] = str(run_dir)
        if trainer_cfg.get("enable_model_summary") is None and not is_verbose():
            kwargs["enable_model_summary"] = False  # the start-of-run summary says it in three lines
        given = trainer_cfg.get("callbacks") or []
        given = list(given if isinstance(given, list) else [given])
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            given.append(progress_bar())
        if self.subcommand == "fit":
            given.append(RunSummary(run_dir))
        if self.subcommand == "fit":  # forgetting checks: scored before and after fine-tuning
            from mmtune.evaluation.retention import retention_callbacks

            extra = retention_callbacks(as_retention_spec(self._get(self.config_init, "retention")))
            extra += fault_callbacks(self._fault_spec())  # NaN/inf guard, last.ckpt on SIGTERM
            given += extra
        kwargs["callbacks"] = given
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": self._config_filename()}
        trainer = super().instantiate_trainer(**kwargs)
        # First, so the loggers are open before any other callback's on_fit_start logs to them.
        opener = [c for c in trainer.callbacks if isinstance(c, RunConfigCallback)]
        trainer.callbacks = opener + [c for c in trainer.callbacks if c not in opener]
        return trainer


def run_lightning(argv: Optional[list[str]] = None) -> None:
    """The Lightning verbs (fit, validate, test, predict, evaluate) through `MMTuneCLI`; `argv=None`
    reads the shell's arguments. `mmtune.entry.main` dispatches here and prints mmtune's errors."""
    quiet_terminal()
    MMTuneCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        seed_everything_default=42, auto_configure_optimizers=False, args=argv,
        save_config_callback=RunConfigCallback, parser_class=MMTuneArgumentParser, parser_kwargs={"prog": "mmtune"}, save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 10},
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Every verb, as the `mmtune` command (kept here for `from mmtune.cli import main`)."""
    from mmtune.entry import main as entry_main

    entry_main(argv)


if __name__ == "__main__":
    main()

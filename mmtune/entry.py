"""The `mmtune` console script: a light dispatcher in front of the verbs.

Why a module of its own: `mmtune --help`, `mmtune data --help` and the help of `export`, `report` and
`data align` must answer at once, and importing Lightning (with torch and transformers behind it) costs
seconds. This module imports nothing heavy; each verb imports what it needs when it runs. The Lightning
verbs (fit, validate, test, predict, evaluate) are handed to `mmtune.cli`, which builds LightningCLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from mmtune.cli_errors import parse_or_explain
from mmtune.errors import ConfigError, MMTuneError
from mmtune.quiet import VERBOSE_ENV, quiet_terminal

# verb -> one line; the order is the order of work
VERBS = {
    "fit": "Train a task from a YAML config (resume with --ckpt_path last).",
    "validate": "Score a checkpoint on the validation split.",
    "test": "Score a checkpoint on the test split: metrics with bootstrap intervals, subgroups, report.html.",
    "predict": "Write predictions for a folder, manifest or data file (predictions.csv).",
    "evaluate": "Score the tuned model and a baseline (base, a checkpoint, an export) on the same test set.",
    "export": "Write a deployable model: native safetensors, ONNX or ExecuTorch (optionally int8), verified.",
    "report": "Write report.html, the run report, from a run directory's files.",
    "tune": "Search hyperparameters with Optuna: each trial a fit run, pruning, resumable, many workers.",
    "federated": "Federated fine-tuning on Flower: sites train on their own data, only adapters travel.",
    "continual": "Continual fine-tuning: stage after stage with replay and LwF; forgetting measured.",
    "data align": "Join image files and texts by key, check and split them (the image-text pair aligner).",
}
LIGHTNING_VERBS = ("fit", "validate", "test", "predict", "evaluate")
DATA_VERBS = {"align": VERBS["data align"]}


def overview() -> str:
    """The text of `mmtune --help`."""
    width = max(len(v) for v in VERBS)
    lines = ["usage: mmtune <verb> [options]   (mmtune <verb> --help for a verb's options)", "",
             "Fine-tune image classifiers, vision-language models, image-text aligners and LLMs with one tool.", "",
             "verbs:"]
    lines += [f"  {verb.ljust(width)}  {text}" for verb, text in VERBS.items()]
    lines += ["", "options of every verb:",
              "  --verbose  also show Lightning's and the libraries' own messages, warnings and progress bars",
              "", "examples:",
              "  mmtune fit      --config configs/classification/vit_lora.yaml",
              "  mmtune test     --config configs/classification/vit_lora.yaml --ckpt_path best",
              "  mmtune evaluate --config configs/classification/vit_lora.yaml --ckpt_path best --baseline base",
              "  mmtune tune     --search configs/search/vit_lora_lr.yaml --n_trials 20",
              "  mmtune report   runs/vit_lora/version_0"]
    return "\n".join(lines)


def _data_overview() -> str:
    width = max(len(v) for v in DATA_VERBS)
    return "\n".join(["usage: mmtune data <verb> [options]   (mmtune data <verb> --help)", "", "verbs:",
                      *(f"  {verb.ljust(width)}  {text}" for verb, text in DATA_VERBS.items())])


def export(argv: list[str]) -> None:
    """`mmtune export`: the model in its native format (safetensors, default), ONNX or ExecuTorch, optionally
    int8, with the preprocessing sidecar and a verification report (see `mmtune.export`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune export", description=VERBS["export"])
    parser.add_argument("--ckpt_path", type=str, required=True, help="An mmtune checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="Output directory")
    parser.add_argument("--format", type=str, default="safetensors",
                        help="safetensors (the family's native layout), onnx or executorch (.pte, XNNPACK)")
    parser.add_argument("--quantize", type=Optional[str], default=None,
                        help="int8: static QDQ (onnx) or PT2E/XNNPACK (executorch), calibrated on validation images; text towers: dynamic")
    parser.add_argument("--data", type=Optional[str], default=None,
                        help="Folder or manifest to verify and calibrate on (default: the run's data, from config.yaml)")
    parser.add_argument("--image_size", type=Optional[int], default=None,
                        help="The size the model was trained at, when the run's config.yaml is not beside the checkpoint")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="Largest allowed logit difference of a float export from the trained model")
    parser.add_argument("--min_agreement", type=float, default=0.9,
                        help="Smallest allowed share of validation labels an int8 export keeps")
    parser.add_argument("--min_cosine", type=float, default=0.95,
                        help="Image-text and text-embedding towers: smallest allowed mean cosine of int8 to trained embeddings")
    parser.add_argument("--trust_remote_code", type=bool, default=False,
                        help="Allow a checkpoint whose model sets trust_remote_code: true (runs code from the model "
                             "folder or hub; only for checkpoints and models you trust)")
    args = parse_or_explain(parser, argv)
    from mmtune.export.pipeline import ExportOptions, run_export

    opts = ExportOptions(format=args.format, quantize=args.quantize, data=args.data, image_size=args.image_size,
                         tolerance=args.tolerance, min_agreement=args.min_agreement, min_cosine=args.min_cosine,
                         trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    report = run_export(args.ckpt_path, out, opts)
    check = report.get("verification")
    if check and "images" in check:
        detail = (f"; verified on {check['images']} images: max |diff| {check['max_abs_diff']:.3g}, labels agree "
                  f"{check['label_agreement']:.1%}")
    else:  # embedding towers: one check per tower file
        detail = "".join(f"; {name} verified on {c['items']} inputs: max |diff| {c['max_abs_diff']:.3g}, mean cosine "
                         f"{c['mean_cosine']:.4f}" for name, c in (check or {}).items())
    print(f"[mmtune] exported {args.ckpt_path} -> {out} ({args.format}{' int8' if report.get('quantize') else ''}{detail})")


EXPORTED_SUFFIXES = (".onnx", ".pte")


def exported_model_of(argv: list[str]) -> Optional[str]:
    """The `--model` value of a predict command line when it names an exported file (.onnx/.pte)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--model" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--model=") else None)
        if value and value.lower().endswith(EXPORTED_SUFFIXES):
            return value
    return None


def predict_exported(argv: list[str]) -> None:
    """`mmtune predict --model exported/model.onnx --data DIR_OR_MANIFEST`: runs an exported file."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune predict --model FILE", description="Predictions from an exported model "
                            "(.onnx, .pte) preprocessed from its preprocessing.json; same CSV as predict")
    parser.add_argument("--model", type=str, required=True, help="An exported .onnx or .pte file")
    parser.add_argument("--data", type=str, required=True, help="An image folder or a CSV/JSONL manifest")
    parser.add_argument("--out", type=Optional[str], default=None, help="CSV to write (default: beside the model)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=Optional[int], default=None,
                        help="Preprocess at this size instead of the sidecar's (must match the file)")
    args = parse_or_explain(parser, argv)
    from mmtune.export.predict import predict_exported as run

    run(args.model, args.data, args.out, args.batch_size, args.image_size)


def report(argv: list[str]) -> None:
    """`mmtune report RUN_DIR`: (re)writes the run report from a run directory's files."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune report", description=VERBS["report"] + " (config, metrics, curves, "
                            "test records, comparisons)")
    parser.add_argument("run_dir", type=str, help="A run directory, e.g. runs/<name>/version_0")
    args = parse_or_explain(parser, argv)
    from mmtune.evaluation.report import build_report

    built = build_report(Path(args.run_dir))
    path = built.write()
    for line in built.missing:
        print(f"[mmtune] not recorded for this run: {line}")
    print(f"[mmtune] report: {path}")


def data(argv: list[str]) -> None:
    """`mmtune data <verb>`: data tools that run before training (today: `align`)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_data_overview())
        return
    if argv[0] != "align":
        raise ConfigError(f"mmtune data: unknown command {argv[0]!r}; known: {', '.join(DATA_VERBS)} "
                          "(mmtune data --help)")
    from mmtune.data.align.cli import run

    run(argv[1:])


def tune(argv: list[str]) -> None:
    """`mmtune tune`: a hyperparameter sweep (Optuna, imported only here)."""
    try:
        from mmtune.tune.cli import main as tune_main
    except ImportError as err:
        if "optuna" not in str(err):
            raise
        raise ConfigError("mmtune tune needs Optuna: pip install 'mmtune[tune]'") from None
    tune_main(argv)


def federated(argv: list[str]) -> None:
    """`mmtune federated`: Flower federation (simulated on one machine with --simulate N)."""
    from mmtune.federated.cli import main as federated_main

    federated_main(argv)


def continual(argv: list[str]) -> None:
    """`mmtune continual`: stages trained one after another, forgetting measured after each."""
    from mmtune.continual.cli import main as continual_main

    continual_main(argv)


PLAIN_VERBS: dict[str, Callable[[list[str]], None]] = {"export": export, "report": report, "data": data,
                                                       "tune": tune, "federated": federated, "continual": continual}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `mmtune` console script (and of `python -m mmtune`)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbose = take_verbose(argv)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # also read by processes a DDP launch starts
        if from_shell:
            sys.argv = [sys.argv[0], *argv]
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(overview())
            return
        if argv[0] == "--version":
            from mmtune import __version__

            print(f"mmtune {__version__}")
            return
        if argv[0] == "predict" and exported_model_of(argv[1:]):
            quiet_terminal()
            predict_exported(argv[1:])
            return
        if argv[0] in PLAIN_VERBS:
            quiet_terminal()
            PLAIN_VERBS[argv[0]](argv[1:])
            return
        if argv[0] not in LIGHTNING_VERBS and not argv[0].startswith("-"):
            import difflib

            near = difflib.get_close_matches(argv[0], [*LIGHTNING_VERBS, *PLAIN_VERBS], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown verb {argv[0]!r}{hint} (mmtune --help lists them)")
        from mmtune.cli import run_lightning

        run_lightning(None if from_shell else argv)
    except Exception as err:  # noqa: BLE001
        user_error = user_error_of(err)
        if user_error is None:
            raise
        print(f"mmtune: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def take_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without mmtune's bare `--verbose` flag, and whether it was there. A `--verbose true/false`
    is left alone: that is Lightning's own option of `test` and `validate` (print the result table)."""
    kept, verbose = [], False
    for i, arg in enumerate(argv):
        following = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if arg == "--verbose" and following not in ("true", "false", "yes", "no", "1", "0"):
            verbose = True
        else:
            kept.append(arg)
    return kept, verbose


def user_error_of(err: BaseException) -> Optional[MMTuneError]:
    """The MMTuneError behind `err`, if any (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MMTuneError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()

"""The `mmtune` console script: a light dispatcher in front of the verbs.

Why a module of its own: `mmtune --help`, `mmtune data --help` and the help of `export`, `report` and
`data align` must answer at once, and importing Lightning (with torch and transformers behind it) costs
seconds. This module imports nothing heavy; each verb imports what it needs when it runs. The Lightning
verbs (fit, validate, test, predict, evaluate) are handed to `mmtune.cli`, which builds LightningCLI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from mmtune.errors import ConfigError, MMTuneError

# verb -> one line; the order is the order of work
VERBS = {
    "fit": "Train a task from a YAML config (resume with --ckpt_path last).",
    "validate": "Score a checkpoint on the validation split.",
    "test": "Score a checkpoint on the test split: metrics with bootstrap intervals, subgroups, report.html.",
    "predict": "Write predictions for a folder, manifest or data file (predictions.csv).",
    "evaluate": "Score the tuned model and a baseline (base, a checkpoint, an export) on the same test set.",
    "export": "Merge adapters and write the model's native format (safetensors) with a model card.",
    "report": "Write report.html, the run report, from a run directory's files.",
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
    lines += ["", "examples:",
              "  mmtune fit      --config configs/classification/vit_lora.yaml",
              "  mmtune test     --config configs/classification/vit_lora.yaml --ckpt_path best",
              "  mmtune evaluate --config configs/classification/vit_lora.yaml --ckpt_path best --baseline base",
              "  mmtune report   runs/vit_lora/version_0"]
    return "\n".join(lines)


def _data_overview() -> str:
    width = max(len(v) for v in DATA_VERBS)
    return "\n".join(["usage: mmtune data <verb> [options]   (mmtune data <verb> --help)", "", "verbs:",
                      *(f"  {verb.ljust(width)}  {text}" for verb, text in DATA_VERBS.items())])


def export(argv: list[str]) -> None:
    """`mmtune export`: merged weights in the model family's native format, plus a model card."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune export", description=VERBS["export"])
    parser.add_argument("--ckpt_path", type=str, required=True, help="An mmtune checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="Output directory")
    parser.add_argument("--trust_remote_code", type=bool, default=False,
                        help="Allow a checkpoint whose model sets trust_remote_code: true (runs code from the model "
                             "folder or hub; only for checkpoints and models you trust)")
    args = parser.parse_args(argv)
    from mmtune.evaluation.model_card import write_model_card
    from mmtune.tasks.common import load_task

    from mmtune.files import atomic_folder

    task = load_task(args.ckpt_path, trust_remote_code=args.trust_remote_code)
    ckpt, out = Path(args.ckpt_path), Path(args.out)
    # Written into a temporary folder beside --out and renamed when complete: a kill or a full disk
    # mid-export leaves no half export, and a previous export at --out stays whole until then.
    with atomic_folder(out) as staging:
        task.export(str(staging))
        write_model_card(staging, ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None, out.name)
    print(f"[mmtune] exported {args.ckpt_path} -> {out} (model card: {out / 'README.md'})")


def report(argv: list[str]) -> None:
    """`mmtune report RUN_DIR`: (re)writes the run report from a run directory's files."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="mmtune report", description=VERBS["report"] + " (config, metrics, curves, "
                            "test records, comparisons)")
    parser.add_argument("run_dir", type=str, help="A run directory, e.g. runs/<name>/version_0")
    args = parser.parse_args(argv)
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


def federated(argv: list[str]) -> None:
    """`mmtune federated`: Flower federation (simulated on one machine with --simulate N)."""
    from mmtune.federated.cli import main as federated_main

    federated_main(argv)


def continual(argv: list[str]) -> None:
    """`mmtune continual`: stages trained one after another, forgetting measured after each."""
    from mmtune.continual.cli import main as continual_main

    continual_main(argv)


PLAIN_VERBS: dict[str, Callable[[list[str]], None]] = {"export": export, "report": report, "data": data,
                                                       "federated": federated, "continual": continual}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `mmtune` console script (and of `python -m mmtune`)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(overview())
            return
        if argv[0] == "--version":
            from mmtune import __version__

            print(f"mmtune {__version__}")
            return
        if argv[0] in PLAIN_VERBS:
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

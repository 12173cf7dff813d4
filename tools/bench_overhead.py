#!/usr/bin/env python
"""Framework overhead of mmtune: training throughput against a hand-written PyTorch loop, and peak
memory of LoRA against full fine-tuning.

For every model and adapter setting (`lora`, `full`) two runners train the same thing:

* ``mmtune``: `ImageClassificationTask` + `ImageClassificationData` under `lightning.Trainer`
  (no logger, checkpoints, progress bar, validation or monitor callbacks);
* ``plain``: a plain loop (forward, cross entropy, backward, step, zero_grad, scheduler step) over
  the same model (`build_classifier` + `apply_adapter` exactly as the task's `configure_model`), the
  same batches (the data module's own `train_dataloader()`), the same AdamW parameter groups
  (`mmtune.optim.param_groups` + `build_optimizer`) and the same LambdaLR schedule.

Each (model, adapter, runner) runs in its own subprocess, so peak memory is per configuration
(`ru_maxrss` on CPU, `torch.cuda.max_memory_allocated` on CUDA), with the same torch thread count.
Only the training steps after `--warmup` are timed (startup, model build and the first steps
excluded): images/s = timed images / wall time of the timed steps. Repeats are interleaved (runner
order alternates) and the medians are reported; the ratio is the median of the per-repeat ratios.

Other processes distort CPU timings badly (with every core used by torch threads, a second busy
process can make steps 10-100x slower), so before each run the script waits (up to `--max-wait` s)
for the machine to go quiet, measures the CPU used by other processes during the timed window
(from /proc/stat), and reruns a disturbed configuration (`--retries`); rows still disturbed are
marked. `mmtune/plain by CPU time` compares CPU time per step of the process and its loader
workers instead of wall time: steadier under load with `--threads 1`. `RSS growth` is peak RSS
minus the RSS before the model was built (model, optimizer state, activations; not the ~0.9 GB of
imported libraries).

The data is synthetic and written offline (`tools/make_defect_data.py`); models come from timm with
random weights, so nothing is downloaded.

Usage::

    python tools/bench_overhead.py                      # vit_tiny + resnet18, 64 px, batch 16, CPU
    python tools/bench_overhead.py --models timm:resnet50 --steps 40 --image-size 128 --out bench.md
    python tools/bench_overhead.py --device cuda --image-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fair_threads import HELP as THREADS_HELP, oversubscription_warning  # noqa: E402  (tools/ is a folder of scripts)

RESULT_MARK = "BENCH_RESULT "
DEFAULT_MODELS = ("timm:vit_tiny_patch16_224", "timm:resnet18")
TARGET_RATIO = 0.95
LORA_TARGET = 0.9  # LoRA step time / full fine-tuning step time


# ---- synthetic data ------------------------------------------------------------------------------
def make_data(out_dir: Path, per_class: int, size: int, seed: int) -> Path:
    """Writes the seeded synthetic defect data set (4 classes, PNG + manifest.csv); returns the manifest."""
    path = Path(__file__).resolve().parent / "make_defect_data.py"
    spec = importlib.util.spec_from_file_location("_mmtune_make_defect_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_defect_dataset(out_dir, per_class=per_class, size=size, seed=seed, lots=8)


# ---- worker: one configuration in its own process ------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_snapshot() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine incl. steal, jiffies of this process and its children), or None
    off Linux. The difference over a window is CPU used by other processes: the load to watch for."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        own = 0
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if entry == me or fields[1] == me:  # this process or its loader workers
                own += int(fields[11]) + int(fields[12])
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], own
    except (OSError, ValueError, IndexError):
        return None


def _foreign_cores(before, after, seconds: float) -> float | None:
    """CPU cores' worth of work done by other processes between two snapshots."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK") / seconds)


def busy_cores(seconds: float = 1.0) -> float | None:
    """CPU cores' worth of work done on the machine (by anyone but this process) over `seconds`."""
    a = _cpu_snapshot()
    time.sleep(seconds)
    return _foreign_cores(a, _cpu_snapshot(), seconds)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _model_spec(name: str, image_size: int):
    """A ModelSpec with random weights; timm models that take `img_size` (ViTs) are built for the image size."""
    import torch

    from mmtune import ModelSpec
    from mmtune.models.vision import resolve_classifier_ref

    spec = ModelSpec(name=name, pretrained=False)
    family, ref = resolve_classifier_ref(spec)
    if family == "timm":
        import timm

        try:
            with torch.device("meta"):
                timm.create_model(ref, pretrained=False, img_size=image_size)
            spec.kwargs = {"img_size": image_size}
        except TypeError:
            pass
    return spec


def _data_module(cfg: dict):
    from mmtune import ImageClassificationData

    return ImageClassificationData(path=cfg["manifest"], batch_size=cfg["batch_size"], num_workers=cfg["workers"],
                                   image_size=cfg["image_size"], seed=cfg["seed"])


def _adapter_spec(cfg: dict):
    from mmtune import AdapterSpec

    if cfg["adapter"] == "lora":
        return AdapterSpec(method="lora", r=cfg["lora_r"], alpha=2.0 * cfg["lora_r"])
    return AdapterSpec(method="none")


class _Window:
    """Wall-clock window over steps [warmup, steps), plus per-step end times for a median step time."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = self.t1 = None
        self.ends: list[float] = []
        self.threads = None
        self.cpu0 = self.cpu1 = None

    def start(self, step: int) -> None:
        if step == self.warmup:
            import torch

            _sync(self.device)
            self.cpu0 = _cpu_snapshot()
            self.t0 = time.perf_counter()
            self.threads = torch.get_num_threads()

    def end(self, done: int) -> None:  # `done`: steps completed so far
        if done > self.warmup:
            _sync(self.device)
            self.ends.append(time.perf_counter())
            if done == self.steps:
                self.t1 = self.ends[-1]
                self.cpu1 = _cpu_snapshot()

    def result(self, batch_size: int) -> dict:
        measured = self.steps - self.warmup
        times = [b - a for a, b in zip([self.t0] + self.ends[:-1], self.ends)]
        return {
            "images_per_s": measured * batch_size / (self.t1 - self.t0),
            "median_step_ms": 1000 * statistics.median(times),
            "measured_steps": measured, "threads_in_window": self.threads,
            "step_ms": [round(1000 * t, 1) for t in times],
            "foreign_cores": _foreign_cores(self.cpu0, self.cpu1, self.t1 - self.t0),
            "own_cpu_ms_per_step": (None if self.cpu0 is None or self.cpu1 is None else
                                    1000 * (self.cpu1[1] - self.cpu0[1]) / os.sysconf("SC_CLK_TCK") / measured),
        }


def run_mmtune(cfg: dict) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from mmtune import ImageClassificationTask, MonitorSpec, OptimizerSpec

    window = _Window(cfg["warmup"], cfg["steps"], cfg["device"])

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            window.start(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            window.end(trainer.global_step)

    dm = _data_module(cfg)
    task = ImageClassificationTask(
        model=_model_spec(cfg["model"], cfg["image_size"]), adapter=_adapter_spec(cfg), optimizer=OptimizerSpec(),
        monitor=MonitorSpec(early_stopping=False, save_best=False, save_last=False),
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="gpu" if cfg["device"] == "cuda" else "cpu", devices=1, max_steps=cfg["steps"],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()], default_root_dir=root,
            precision=cfg.get("precision", "32-true"),
        )
        base = _rss_mb()
        trainer.fit(task, datamodule=dm)
    out = window.result(cfg["batch_size"])
    out.update(trainable=task.adapter_report.trainable, total=task.adapter_report.total, rss_before_model_mb=base)
    return out


def run_plain(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from mmtune.adapters import apply_adapter
    from mmtune.models.vision import CLASSIFIER_FAMILIES, build_classifier, classifier_data_config
    from mmtune.optim import build_optimizer, lr_lambda, param_groups
    from mmtune.specs import OptimizerSpec
    from mmtune.tasks.classification import PARTS_DOC

    device = torch.device(cfg["device"])
    spec, adapter, opt_spec = _model_spec(cfg["model"], cfg["image_size"]), _adapter_spec(cfg), OptimizerSpec()

    # data: the data module's own loader, connected as ImageClassificationTask.setup does
    dm = _data_module(cfg)
    dm.setup("fit")
    dm.connect(list(dm.classes), bool(dm.multi_label), classifier_data_config(spec))
    loader = dm.train_dataloader()

    # model: as ImageClassificationTask.configure_model
    base = _rss_mb()
    clf = build_classifier(spec, len(dm.classes))
    family = CLASSIFIER_FAMILIES.get(clf.family)
    net, report = apply_adapter(
        clf.module, adapter, clf.family, parts={"backbone": None, "head": clf.head},
        default_policies={"backbone": "adapter", "head": "full"},
        layer_ids=lambda raw: family.layer_ids(raw, clf.head),
    )
    net.to(device)

    # optimizer + schedule: as ImageClassificationTask.configure_optimizers (no layer decay here)
    raw = net.get_base_model() if adapter.method != "none" else net
    head = clf.head

    def part_of(name: str) -> str:
        return "head" if any(name == h or name.startswith(h + ".") for h in head) else "backbone"

    no_decay = raw.no_weight_decay() if hasattr(raw, "no_weight_decay") else ()
    groups = param_groups(raw.named_parameters(), opt_spec, layer_ids=None, part_of=part_of,
                          part_names=PARTS_DOC, no_decay=no_decay)
    optimizer = build_optimizer(groups, opt_spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt_spec, cfg["steps"]))

    window = _Window(cfg["warmup"], cfg["steps"], cfg["device"])
    net.train()
    step, epoch = 0, 0
    while step < cfg["steps"]:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            window.start(step)
            pixels = batch["pixels"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.get("precision") == "bf16-mixed"):
                loss = F.cross_entropy(net(pixels), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            window.end(step)
            if step == cfg["steps"]:
                break
        epoch += 1
    out = window.result(cfg["batch_size"])
    out.update(trainable=report.trainable, total=report.total, rss_before_model_mb=base)
    return out


def worker(cfg: dict) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    import lightning as L
    import peft  # noqa: F401  (imported by LoRA runs only otherwise: keeps its ~50 MB of modules out of the LoRA/full memory comparison)

    L.seed_everything(cfg["seed"], verbose=False)
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = (run_mmtune if cfg["runner"] == "mmtune" else run_plain)(cfg)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["train_rss_mb"] = out["peak_rss_mb"] - out["rss_before_model_mb"]
    if cfg["device"] == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(RESULT_MARK + json.dumps({**cfg, **out}), flush=True)


# ---- driver --------------------------------------------------------------------------------------
def wait_quiet(limit: float, max_wait: float) -> float | None:
    """Waits (up to `max_wait` s) until other processes use less than `limit` cores; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        load = busy_cores(1.0)
        if load is None or load <= limit or time.monotonic() >= deadline:
            return load
        time.sleep(4.0)


def run_one(cfg: dict, args) -> dict:
    """Runs one configuration in a subprocess; reruns it (up to `args.retries` times) when other
    processes used more than `args.max_foreign` cores during its timed window."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    best = None
    for attempt in range(args.retries + 1):
        wait_quiet(args.max_foreign, args.max_wait)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"worker failed: {cfg['runner']} {cfg['model']} {cfg['adapter']} (exit {proc.returncode})")
        res = json.loads(lines[-1][len(RESULT_MARK):])
        res["attempts"] = attempt + 1
        foreign = res.get("foreign_cores")
        if not args.quiet:
            print(f"  {res['runner']:6s} {res['model']:28s} {res['adapter']:4s} {res['images_per_s']:8.1f} img/s"
                  f"  median step {res['median_step_ms']:6.1f} ms  CPU/step {res.get('own_cpu_ms_per_step') or 0:6.1f} ms"
                  f"  peak RSS {res['peak_rss_mb']:5.0f} MB"
                  f"  other processes {'?' if foreign is None else f'{foreign:.2f}'} cores", flush=True)
        if best is None or (foreign or 0.0) < (best.get("foreign_cores") or 0.0):
            best = dict(res, attempts=attempt + 1)
        if foreign is None or foreign <= args.max_foreign:
            break
        if not args.quiet and attempt < args.retries:
            print(f"    (other processes were busy: rerunning, attempt {attempt + 2} of {args.retries + 1})", flush=True)
    return best


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def tables(results: list[dict], device: str, max_foreign: float) -> tuple[str, list[float]]:
    """The markdown tables (throughput, memory) and the median mmtune/plain ratio of each configuration."""
    def runs(model, adapter, runner=None):
        return [r for r in results if (r["model"], r["adapter"]) == (model, adapter) and runner in (None, r["runner"])]

    def med(model, adapter, runner, key):
        return statistics.median(r[key] for r in runs(model, adapter, runner))

    def per_repeat(model, adapter, fn):  # fn(mmtune run, plain run) over the repeats that have both
        by = {(r["repeat"], r["runner"]): r for r in runs(model, adapter)}
        reps = sorted({k for k, _ in by})
        return [fn(by[(k, "mmtune")], by[(k, "plain")]) for k in reps if (k, "plain") in by and (k, "mmtune") in by]

    def step_ms(r):
        return 1000 * r["batch_size"] / r["images_per_s"]

    models = list(dict.fromkeys(r["model"] for r in results))
    adapters = list(dict.fromkeys(r["adapter"] for r in results))
    mem_key, mem_name = ("peak_cuda_mb", "peak CUDA MB") if device == "cuda" else ("peak_rss_mb", "peak RSS MB")
    ratios = []
    lines = [
        "| model | adapter | trainable params | plain img/s | mmtune img/s | mmtune/plain (range) "
        f"| mmtune/plain by CPU time | mmtune extra ms/step | {mem_name} plain | {mem_name} mmtune |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for a in adapters:
            rs = per_repeat(m, a, lambda mm, pl: mm["images_per_s"] / pl["images_per_s"])
            extra = statistics.median(per_repeat(m, a, lambda mm, pl: step_ms(mm) - step_ms(pl)))
            ratio = statistics.median(rs)
            cpu_rs = per_repeat(m, a, lambda mm, pl: (pl.get("own_cpu_ms_per_step") or 0.0) / mm["own_cpu_ms_per_step"]
                                if mm.get("own_cpu_ms_per_step") else float("nan"))
            disturbed = any((r.get("foreign_cores") or 0.0) > max_foreign for r in runs(m, a))
            ratios.append(ratio)
            lines.append(
                f"| {m.removeprefix('timm:')}{' (†)' if disturbed else ''} | {a} | {_fmt_params(runs(m, a)[0]['trainable'])} "
                f"| {med(m, a, 'plain', 'images_per_s'):.1f} | {med(m, a, 'mmtune', 'images_per_s'):.1f} "
                f"| **{ratio:.3f}** ({min(rs):.3f}-{max(rs):.3f}) | {statistics.median(cpu_rs):.3f} | {extra:+.1f} "
                f"| {med(m, a, 'plain', mem_key):.0f} | {med(m, a, 'mmtune', mem_key):.0f} |"
            )
    if {"lora", "full"} <= set(adapters):
        cpu = device != "cuda"
        head = f"| model | runner | {mem_name} LoRA | {mem_name} full | LoRA/full |"
        rule = "|---|---|---:|---:|---:|"
        if cpu:
            head += " RSS growth MB LoRA | RSS growth MB full | LoRA/full (growth) |"
            rule += "---:|---:|---:|"
        lines += ["", head, rule]
        for m in models:
            for runner in ("mmtune", "plain"):
                lo, fu = med(m, "lora", runner, mem_key), med(m, "full", runner, mem_key)
                row = f"| {m.removeprefix('timm:')} | {runner} | {lo:.0f} | {fu:.0f} | **{lo / fu:.2f}** |"
                if cpu:
                    glo, gfu = med(m, "lora", runner, "train_rss_mb"), med(m, "full", runner, "train_rss_mb")
                    row += f" {glo:.0f} | {gfu:.0f} | {glo / gfu:.2f} |"
                lines.append(row)
        # LoRA trains a fraction of the weights: it must not take longer per step than full fine-tuning.
        lines += ["", f"| model | runner | step ms LoRA | step ms full | LoRA/full step time (target <= {LORA_TARGET}) |",
                  "|---|---|---:|---:|---:|"]
        for m in models:
            for runner in ("mmtune", "plain"):
                lo, fu = med(m, "lora", runner, "median_step_ms"), med(m, "full", runner, "median_step_ms")
                lines.append(f"| {m.removeprefix('timm:')} | {runner} | {lo:.1f} | {fu:.1f} | **{lo / fu:.2f}** |")
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="timm/torchvision names (random weights; ViTs get img_size = --image-size)")
    parser.add_argument("--adapters", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run, warmup included")
    parser.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both runners)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="Lightning precision of mmtune's side; the plain loop autocasts to match")
    parser.add_argument("--per-class", type=int, default=64, help="synthetic images per class (4 classes)")
    parser.add_argument("--data", help="an existing manifest to use instead of synthetic data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when a mmtune/plain ratio is below {TARGET_RATIO}")
    parser.add_argument("--max-foreign", type=float, default=0.2,
                        help="rerun a configuration when other processes used more CPU cores than this while it was timed")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a configuration disturbed by other processes")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds to wait before each run for other processes to go quiet")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")

    from importlib.metadata import version

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    hw = torch.cuda.get_device_name(0) if device == "cuda" else f"{os.cpu_count()} CPU cores, {args.threads} torch threads"
    versions = (f"torch {torch.__version__}, timm {version('timm')}, lightning {version('lightning')}, "
                f"peft {version('peft')}")
    load_start = os.getloadavg()
    if device == "cpu" and (warning := oversubscription_warning(args.threads)):
        print(warning, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmtune-bench-") as tmp:
        manifest = args.data or str(make_data(Path(tmp), args.per_class, args.image_size, args.seed))
        base = dict(manifest=manifest, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                    image_size=args.image_size, workers=args.workers, threads=args.threads, lora_r=args.lora_r,
                    device=device, seed=args.seed, precision=args.precision)
        if not args.quiet:
            print(f"# {hw}; {versions}; load average {load_start[0]:.2f}", flush=True)
        results = []
        for rep in range(args.repeats):
            runners = ("plain", "mmtune") if rep % 2 == 0 else ("mmtune", "plain")
            for model in args.models:
                for adapter in args.adapters:
                    for runner in runners:
                        cfg = dict(base, model=model, adapter=adapter, runner=runner)
                        results.append(dict(run_one(cfg, args), repeat=rep))
    load_end = os.getloadavg()
    table, ratios = tables(results, device, args.max_foreign)
    foreign = [r["foreign_cores"] for r in results if r.get("foreign_cores") is not None]
    reruns = sum(r["attempts"] - 1 for r in results)
    ok = min(ratios) >= TARGET_RATIO
    command = "python tools/bench_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join([
        f"Command: `{command.strip()}`",
        f"Device: {hw}; {versions}; Python {sys.version.split()[0]}.",
        f"Settings: {args.steps} steps ({args.warmup} warmup steps untimed), batch {args.batch_size}, "
        f"{args.image_size} px, {args.workers} loader workers, LoRA r={args.lora_r}, {args.repeats} interleaved "
        f"repeats (median); each run in its own process.",
        f"Other processes during the timed windows: median {statistics.median(foreign or [0]):.2f}, "
        f"max {max(foreign or [0]):.2f} CPU cores ({reruns} run(s) repeated because of them); "
        f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
        f"total time {time.perf_counter() - started:.0f} s.",
        "",
        table,
        "",
        *([f"(†): other processes used more than {args.max_foreign} cores during some timed window of this row "
           "even after the reruns; its figures are less reliable.", ""]
          if any((r.get("foreign_cores") or 0.0) > args.max_foreign for r in results) else []),
        f"mmtune/plain throughput ratio: min {min(ratios):.3f}, median {statistics.median(ratios):.3f} "
        f"(target >= {TARGET_RATIO}: {'met' if ok else 'NOT met'}).",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())

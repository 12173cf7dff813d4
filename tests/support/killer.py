"""A callback that kills its own process mid-epoch, like an OOM kill or a pre-empted node."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtEpoch(Callback):
    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Callback):
    """Kills its own process halfway through writing a checkpoint file, like a pre-emption that lands
    during a save: on the `nth` write of a file whose name contains `name`, half of the checkpoint's
    bytes reach the file, then SIGKILL."""

    def __init__(self, name: str = "last.ckpt", nth: int = 2) -> None:
        self.name, self.nth, self.seen = name, nth, 0

    def setup(self, trainer, pl_module, stage) -> None:
        import io

        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if self.name in str(getattr(f, "name", f)):
                self.seen += 1
                if self.seen == self.nth:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    if hasattr(f, "write"):
                        f.write(data[: len(data) // 2])
                        f.flush()
                    else:
                        with open(f, "wb") as out:
                            out.write(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


def with_callback(config, out, class_path: str, **init_args):
    """A copy of the YAML `config` at `out` whose trainer also runs the callback `class_path`."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load(Path(config).read_text())
    data["trainer"]["callbacks"] = [{"class_path": class_path, "init_args": init_args}]
    Path(out).write_text(yaml.safe_dump(data))
    return Path(out)


def fit_process(runs, run_name: str, *args: str, env=None):
    """`mmtune fit --runs_dir runs --run_name run_name *args` in a child process that can import the
    tests' callbacks (`support.*`); returns the finished process (its returncode is -9 when killed)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent.parent)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = f"{tests}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "mmtune", "fit", "--runs_dir", str(runs), "--run_name", run_name, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)

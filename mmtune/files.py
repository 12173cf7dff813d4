"""Crash-safe file writes: a temporary file (or folder) beside the target, then an atomic rename, so a
kill during a write leaves the previous file whole (checkpoints, metrics.json, records, reports,
exports). A full disk stops with a one-line error naming the file instead of leaving half of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

from mmtune.errors import MMTuneError


class WriteError(MMTuneError):
    """A file could not be written (full disk, quota): the previous version of the file is kept."""


def _temporary_name(path: Path) -> Path:
    # Beside the target, so the rename stays on one filesystem (a rename across filesystems is a copy);
    # a dot name, so globs of the folder's real files do not pick it up.
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _clear_error(path: Path, err: OSError) -> MMTuneError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        return WriteError(f"no space left on the device while writing {path} ({os.strerror(err.errno)}); {kept}. "
                          "Free space (or point --runs_dir / --out at a larger disk) and run again")
    return WriteError(f"cannot write {path}: {err.strerror or err}")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """An open file that replaces `path` only once it is completely written (and synced to disk).

    Raises:
        WriteError: the disk filled up (or another OS error) while writing; `path` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _clear_error(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(root: Path) -> None:
    """Gives every file and folder under `root` the permissions a plain `open()` / `mkdir` would
    (0644 / 0755 under umask 022; executables keep their x bits).

    Why: libraries that write atomically themselves create private temporary files (safetensors
    0.8's `save_file` leaves `model.safetensors` at 0600, like `tempfile.mkstemp`), so an export
    came out readable by its owner only, unlike every other file of the folder."""
    mask = current_umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; it becomes `out` once everything is written.
    A folder already at `out` is replaced only then (moved aside, the new one moved in, the old one
    removed), so an interrupted write leaves the previous folder whole.

    Raises:
        WriteError: the disk filled up while writing; `out` is unchanged.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out)
    tmp.mkdir()
    try:
        yield tmp
        normal_permissions(tmp)
        if out.exists():
            old = _temporary_name(out)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as err:
        raise _clear_error(out, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes `text` to `path` through a temporary file and `os.replace`."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def update_json(path: Path, key: str, value: Any) -> dict:
    """Sets `key` of the JSON object in `path` (created if missing), keeping the other keys."""
    data = read_json(path, {})
    data[key] = value
    write_text_atomic(path, json.dumps(data, indent=2))
    return data

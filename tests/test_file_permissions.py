"""Files mmtune writes get the permissions of the user's umask, like any file they create: an export
made by a library that writes private temporary files (safetensors) is no exception."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mmtune.files import atomic_folder, atomic_write, current_umask


@pytest.fixture()
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask_022):
    assert current_umask() == 0o022 and current_umask() == 0o022


def test_atomic_folder_gives_library_files_normal_permissions(tmp_path, umask_022):
    from safetensors.torch import save_file

    out = tmp_path / "export"
    with atomic_folder(out) as staging:
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "card.md").write_text("x")
        os.chmod(staging / "sub" / "card.md", 0o600)
    assert _mode(out / "model.safetensors") == 0o644
    assert _mode(out / "sub") == 0o755 and _mode(out / "sub" / "card.md") == 0o644
    assert _mode(out) == 0o755


def test_atomic_write_keeps_umask_permissions(tmp_path, umask_022):
    target = tmp_path / "metrics.json"
    with atomic_write(target) as f:
        f.write("{}")
    assert _mode(target) == 0o644

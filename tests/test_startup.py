"""The `mmtune` command starts light: help at every level without torch or Lightning where the verb
does not need them, every verb listed, and the start-up benchmark runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmtune.entry import VERBS

TOOLS = Path(__file__).parent.parent / "tools"
HEAVY = ("torch", "lightning", "transformers")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_mmtune_loads_nothing_heavy():
    loaded = _modules_after("import mmtune")
    assert not loaded & set(HEAVY)


def test_public_names_still_import_from_the_package():
    loaded = _modules_after("from mmtune import ImageClassificationTask, TextData, ModelSpec")
    assert "lightning" in loaded  # the task really came in, on first use


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["report", "--help"], ["export", "--help"],
                                  ["federated", "--help"], ["continual", "--help"]])
def test_light_help_answers_without_torch(argv):
    code = (f"import contextlib, io\nfrom mmtune.entry import main\nbuf = io.StringIO()\n"
            f"with contextlib.redirect_stdout(buf):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit as e:\n        assert e.code in (0, None)\n"
            f"assert 'usage' in buf.getvalue().lower()")
    loaded = _modules_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_top_level_help_lists_every_verb():
    result = subprocess.run([sys.executable, "-m", "mmtune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for verb in ("fit", "validate", "test", "predict", "evaluate", "export", "report", "data align"):
        assert verb in VERBS and f"  {verb} " in result.stdout


@pytest.mark.parametrize("argv", [["fit", "--help"], ["evaluate", "--help"], ["data", "align", "--help"]])
def test_every_verb_answers_help(argv, capsys):
    from mmtune.entry import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_misspelled_verb_is_one_line_with_the_nearest(capsys):
    from mmtune.entry import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evalute"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmtune: error: unknown verb 'evalute'; did you mean 'evaluate'? (mmtune --help lists them)"


def test_bench_startup_quick():
    result = subprocess.run([sys.executable, str(TOOLS / "bench_startup.py"), "--quick"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert len(table) == 8 and all(line.count("|") == 5 for line in table)

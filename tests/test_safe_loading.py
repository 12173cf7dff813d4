"""Loading never runs code from a file: checkpoints whose pickle would run code, checkpoints naming a
task outside mmtune, models that ship their own Python code, and exports that must hold no pickle."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mmtune.cli
from conftest import only_version, run_cli, write_config
from mmtune import AdapterSpec, ConfigError, ImageClassificationTask, ModelError, ModelSpec
from mmtune.models import aligners, hf, vlm
from mmtune.tasks.common import load_task, read_checkpoint_hparams

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class RunsCode:
    """Unpickling this object runs a shell command that creates `marker`: what a malicious
    checkpoint would do with any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, color_set) -> dict:
    """A real run of the CLI: its config and last.ckpt."""
    root = tmp_path_factory.mktemp("safe")
    runs = root / "runs"
    cfg = write_config(root / "safe.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}}, trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    return {"config": cfg, "runs": runs, "ckpt": only_version(runs, "safe") / "checkpoints" / "last.ckpt"}


def _copy_with(trained: dict, path: Path, **changes) -> Path:
    """The trained checkpoint with top-level entries replaced."""
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    for key, value in changes.items():
        ckpt[key] = value
    torch.save(ckpt, path)
    return path


@pytest.fixture
def malicious(tmp_path, trained) -> tuple[Path, Path]:
    """(checkpoint, marker): the trained checkpoint with a code-running object in its hyperparameters."""
    marker = tmp_path / "MARKER"
    hparams = dict(torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["hyper_parameters"])
    hparams["note"] = RunsCode(marker)
    return _copy_with(trained, tmp_path / "shared.ckpt", hyper_parameters=hparams), marker


def _error_line(err: str) -> str:
    """The CLI's one-line error, checked to be the only one and to come without a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("mmtune: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def _assert_refused(message: str, path: Path) -> None:
    assert f"refusing to load {path}: it holds objects other than tensors and plain values" in message
    assert "weights_only load failed" in message and "system" in message  # names what was refused
    assert "\n" not in message


# ---- a checkpoint whose pickle runs code ----------------------------------------------------------
def test_the_payload_really_runs_code_when_unpickled(malicious):
    """The control: a plain `torch.load(weights_only=False)` of the file runs the command."""
    path, marker = malicious
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("verb", ["fit", "validate", "test", "predict", "evaluate"])
def test_every_lightning_verb_refuses_it(verb, trained, malicious, color_set, capsys):
    path, marker = malicious
    args = [verb, "--config", trained["config"], "--runs_dir", trained["runs"], "--run_name", "attacked",
            "--ckpt_path", path]
    if verb == "predict":
        args += ["--data.predict_path", color_set.parent / "red"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    _assert_refused(_error_line(capsys.readouterr().err), path)
    assert not marker.exists()
    assert not (trained["runs"] / "attacked").exists()  # refused before anything was written


def test_evaluate_refuses_it_as_a_baseline(trained, malicious, capsys):
    path, marker = malicious
    with pytest.raises(SystemExit):
        run_cli("evaluate", "--config", trained["config"], "--runs_dir", trained["runs"], "--run_name", "attacked",
                "--ckpt_path", trained["ckpt"], "--baseline", path)
    _assert_refused(_error_line(capsys.readouterr().err), path)
    assert not marker.exists()


def test_export_refuses_it(tmp_path, malicious, capsys):
    path, marker = malicious
    with pytest.raises(SystemExit) as exit_info:
        run_cli("export", "--ckpt_path", path, "--out", tmp_path / "out")
    assert exit_info.value.code == 2
    _assert_refused(_error_line(capsys.readouterr().err), path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("load", [load_task, read_checkpoint_hparams])
def test_python_loaders_refuse_it(load, malicious):
    path, marker = malicious
    with pytest.raises(ModelError) as info:
        load(str(path))
    _assert_refused(str(info.value), path)
    assert not marker.exists()


def test_lightning_itself_loads_with_weights_only(monkeypatch, trained, malicious):
    """Behind mmtune's own check, Lightning's load is explicitly weights_only=True: it holds even where
    torch's default is switched off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which changes only a None)."""
    path, marker = malicious
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(mmtune.cli, "read_checkpoint", lambda ckpt_path: {})  # leave only Lightning's load
    with pytest.raises(pickle.UnpicklingError):
        run_cli("test", "--config", trained["config"], "--runs_dir", trained["runs"], "--run_name", "attacked",
                "--ckpt_path", path)
    assert not marker.exists()


def test_weights_only_is_not_a_cli_option(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("test", "--config", trained["config"], "--runs_dir", trained["runs"], "--ckpt_path", trained["ckpt"],
                "--weights_only", "false")
    assert exit_info.value.code == 2
    assert "weights_only" in capsys.readouterr().err


# ---- the task class a checkpoint names ------------------------------------------------------------
def test_new_checkpoints_name_a_registered_task(trained):
    assert torch.load(trained["ckpt"], weights_only=True)["mmtune_task"] == "image_classification"
    assert isinstance(load_task(str(trained["ckpt"])), ImageClassificationTask)


def test_old_checkpoints_map_their_class_name_through_the_registry(tmp_path, trained):
    old = _copy_with(trained, tmp_path / "old.ckpt", mmtune_task="mmtune.tasks.classification:ImageClassificationTask")
    assert isinstance(load_task(str(old)), ImageClassificationTask)


@pytest.mark.parametrize("qualname", ["ImageClassificationTask", "Task"])
def test_a_task_outside_mmtune_is_refused_without_importing_it(tmp_path, monkeypatch, trained, capsys, qualname):
    marker = tmp_path / "IMPORTED"
    module = f"evil_tasks_{qualname.lower()}"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass {qualname}: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _copy_with(trained, tmp_path / "foreign.ckpt", mmtune_task=f"{module}:{qualname}")
    with pytest.raises(ModelError) as info:
        load_task(str(path))
    message = str(info.value)
    assert str(path) in message and f"{module}:{qualname}" in message and "image_classification" in message
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", path, "--out", tmp_path / "out")
    assert f"{module}:{qualname}" in _error_line(capsys.readouterr().err)
    assert not marker.exists() and module not in sys.modules
    importlib.import_module(module)  # the control: importing the module named in the file runs its code
    assert marker.exists()
    sys.modules.pop(module)


def test_a_stdlib_function_as_task_is_refused(tmp_path, trained):
    path = _copy_with(trained, tmp_path / "system.ckpt", mmtune_task="os:system")
    with pytest.raises(ModelError, match="names the task 'os:system', which is not one of mmtune's tasks"):
        load_task(str(path))


# ---- models that ship their own Python code ------------------------------------------------------
@pytest.fixture
def custom_code_model(tmp_path) -> tuple[Path, Path]:
    """(model folder, marker): a folder whose configs name classes in its own Python files, which
    create the marker when imported."""
    folder = tmp_path / "custom_model"
    folder.mkdir()
    marker = tmp_path / "CODE_RAN"
    auto = {name: f"custom_code.{name}" for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM",
                                                        "AutoModelForImageTextToText")}
    (folder / "config.json").write_text(json.dumps({"model_type": "mmtune_custom", "auto_map": auto}))
    (folder / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["custom_code.Tokenizer", null]}}')
    (folder / "processor_config.json").write_text('{"auto_map": {"AutoProcessor": "custom_code.Processor"}}')
    (folder / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder, marker


@pytest.mark.parametrize("load", [hf.load_causal_lm, hf.load_tokenizer, vlm.load_vlm, vlm.load_processor,
                                  aligners.resolve_aligner], ids=lambda f: f.__name__)
@pytest.mark.parametrize("pretrained", [True, False])
def test_custom_code_is_refused_by_default(custom_code_model, load, pretrained):
    folder, marker = custom_code_model
    with pytest.raises(ModelError) as info:
        load(ModelSpec(name=str(folder), pretrained=pretrained))
    message = str(info.value)
    assert str(folder) in message and "model.trust_remote_code: true" in message and "\n" not in message
    assert not marker.exists()


def test_custom_code_refusal_reaches_the_cli_as_one_line(tmp_path, custom_code_model, color_set, capsys):
    folder, marker = custom_code_model
    config = {"model": {"class_path": "ImageTextAlignmentTask", "init_args": {"model": {"name": str(folder)}}},
              "data": {"class_path": "ImageTextPairData", "init_args": {"path": str(color_set)}},
              "trainer": {"accelerator": "cpu"}}
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", tmp_path / "custom.yaml", "--runs_dir", tmp_path / "runs")
    assert exit_info.value.code == 2
    assert "model.trust_remote_code: true" in _error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_and_always_explicit(tmp_path, monkeypatch):
    """Off by default, and passed as False rather than left out (transformers' None would ask on a terminal)."""
    import transformers

    assert ModelSpec(name="any").trust_remote_code is False
    folder = _tiny_llama_config(tmp_path)
    seen = _record_kwargs(monkeypatch, transformers.AutoConfig)
    hf.load_causal_lm(ModelSpec(name=str(folder), pretrained=False))
    assert seen and all(kwargs.get("trust_remote_code") is False for kwargs in seen)


def test_trust_remote_code_on_warns_once_per_model(tmp_path, monkeypatch, caplog):
    import transformers

    monkeypatch.setattr(hf, "_WARNED_REMOTE_CODE", set())
    folder = _tiny_llama_config(tmp_path)
    seen = _record_kwargs(monkeypatch, transformers.AutoConfig)
    spec = ModelSpec(name=str(folder), pretrained=False, trust_remote_code=True)
    with caplog.at_level(logging.WARNING, logger="mmtune"):
        hf.load_causal_lm(spec)
        hf.load_causal_lm(spec)
    warnings = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "will run" in warnings[0]
    assert seen and all(kwargs.get("trust_remote_code") is True for kwargs in seen)


@pytest.mark.parametrize("key", ["trust_remote_code", "weights_only"])
def test_model_kwargs_cannot_reopen_what_the_spec_closes(key):
    with pytest.raises(ConfigError, match=f"model.kwargs.{key} is not accepted"):
        ModelSpec(name="any", kwargs={key: True})


def test_export_of_a_checkpoint_asking_for_remote_code_needs_the_flag(tmp_path, trained, capsys):
    """The model spec in a checkpoint comes from the file: the file alone must not turn code on."""
    hparams = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["hyper_parameters"]
    hparams["model"] = {**hparams["model"], "trust_remote_code": True}
    path = _copy_with(trained, tmp_path / "remote.ckpt", hyper_parameters=hparams)
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", path, "--out", tmp_path / "refused")
    assert "pass --trust_remote_code" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "refused").exists()
    run_cli("export", "--ckpt_path", path, "--out", tmp_path / "allowed", "--trust_remote_code", "true")
    assert (tmp_path / "allowed" / "model.safetensors").is_file()


def _tiny_llama_config(root: Path) -> Path:
    from transformers import LlamaConfig

    folder = root / "tiny_llama"
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(folder)
    return folder


def _record_kwargs(monkeypatch, auto_class) -> list[dict]:
    """Records the keyword arguments of every `auto_class.from_pretrained` call (which still runs)."""
    seen: list[dict] = []
    real = auto_class.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(auto_class, "from_pretrained", recording)
    return seen


# ---- exports hold no pickle ----------------------------------------------------------------------
def _pickled_files(folder: Path) -> list[Path]:
    """Files of `folder` in a pickle-based format: by suffix, or by the bytes they start with (a
    pickle protocol 2-5 header, or the zip container of `torch.save`)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors"):
        head = path.read_bytes()[:4]
        if path.suffix in PICKLE_SUFFIXES or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) \
                or head == b"PK\x03\x04":
            found.append(path)
    return found


def _assert_safetensors_only(out: Path) -> None:
    assert list(out.rglob("*.safetensors")), sorted(out.rglob("*"))
    assert _pickled_files(out) == []


def test_classification_export_is_safetensors_only(tmp_path, trained):
    run_cli("export", "--ckpt_path", trained["ckpt"], "--out", tmp_path / "out")
    _assert_safetensors_only(tmp_path / "out")


def test_causal_lm_export_is_safetensors_only(tmp_path):
    from mmtune import CausalLMTask
    from support.text import build_model

    task = CausalLMTask(model=ModelSpec(name=str(build_model("llama", tmp_path))), adapter=AdapterSpec(method="lora", r=2))
    task.configure_model()
    _assert_safetensors_only(task.export(str(tmp_path / "out")))


def test_alignment_export_is_safetensors_only(tmp_path):
    from mmtune import ImageTextAlignmentTask
    from support.tiny_align import save_tiny_clip

    task = ImageTextAlignmentTask(model=ModelSpec(name=str(save_tiny_clip(tmp_path / "clip"))),
                                  adapter=AdapterSpec(method="lora", r=2))
    task.configure_model()
    _assert_safetensors_only(task.export(str(tmp_path / "out")))


def test_the_pickle_check_can_fail(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.safe")  # a torch.save file whatever its name
    with (tmp_path / "plain").open("wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)
    assert _pickled_files(tmp_path) == [tmp_path / "plain", tmp_path / "weights.safe"]

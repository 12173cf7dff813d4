"""Config mistakes answer in one line naming the key and the nearest real key (no usage); list flags
take `0.6,0.1,0.3` as well as `[0.6,0.1,0.3]`; the help of --ckpt_path says what best/last do."""

from __future__ import annotations

import pytest
import yaml

from conftest import run_cli, write_config
from mmtune.cli_errors import nearest, one_line
from mmtune.entry import main as entry_main
from mmtune.entry import take_verbose


def _error_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line: no usage, no tree of union alternatives
    assert err.startswith("mmtune: error: ")
    assert "usage" not in err and "NestedArg" not in err and "NoneType" not in err
    return err


@pytest.fixture()
def cfg(tmp_path, tiny_models, color_set):
    return write_config(tmp_path / "c.yaml", tiny_models["vit"], color_set)


def test_misspelled_key_in_a_config_file_names_the_nearest(tmp_path, tiny_models, color_set, capsys):
    bad = write_config(tmp_path / "bad.yaml", tiny_models["vit"], color_set, model_args={"adapter": {"rank": 4}})
    err = _error_line(capsys, "fit", "--config", bad, "--runs_dir", tmp_path / "runs")
    assert err == ("mmtune: error: unknown key 'model.init_args.adapter.rank'; "
                   "did you mean 'model.init_args.adapter.r'?")
    assert not (tmp_path / "runs").exists()


def test_misspelled_dotted_flag_names_the_nearest(cfg, capsys):
    err = _error_line(capsys, "fit", "--config", cfg, "--model.init_args.lernig_rate", "0.1")
    assert err == ("mmtune: error: unknown key 'model.init_args.lernig_rate'; "
                   "did you mean 'model.init_args.optimizer.lr'?")
    err = _error_line(capsys, "fit", "--config", cfg, "--data.init_args.batch_sise", "4")
    assert "did you mean 'data.init_args.batch_size'?" in err


def test_misspelled_trainer_and_top_level_keys(tmp_path, cfg, capsys):
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["max_epoch"] = raw["trainer"].pop("max_epochs")
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(raw))
    err = _error_line(capsys, "fit", "--config", typo)
    assert err == "mmtune: error: unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
    raw["trainr"] = raw.pop("trainer")
    typo.write_text(yaml.safe_dump(raw))
    assert "did you mean 'trainer." in _error_line(capsys, "fit", "--config", typo)


def test_wrong_type_names_key_value_and_type(cfg, capsys):
    err = _error_line(capsys, "fit", "--config", cfg, "--model.init_args.optimizer.lr", "fast")
    assert err == "mmtune: error: invalid value 'fast' for 'model.init_args.optimizer.lr': expected float"
    err = _error_line(capsys, "fit", "--config", cfg, "--trainer.max_epochs", "many")
    assert err == "mmtune: error: invalid value 'many' for 'trainer.max_epochs': expected int"


def test_misspelled_class_path_names_the_class(tmp_path, cfg, capsys):
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["class_path"] = "ImageClassifcationTask"
    typo = tmp_path / "cls.yaml"
    typo.write_text(yaml.safe_dump(raw))
    err = _error_line(capsys, "fit", "--config", typo)
    assert "did you mean 'ImageClassificationTask'?" in err


@pytest.mark.parametrize("value", ["0.6,0.1,0.3", "[0.6,0.1,0.3]", "=0.6,0.1,0.3"])
def test_list_flags_take_bare_comma_lists(cfg, capsys, value):
    flag = ["--data.init_args.split" + value] if value.startswith("=") else ["--data.init_args.split", value]
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", cfg, *flag, "--print_config")
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["split"] == [0.6, 0.1, 0.3]


def test_a_bare_comma_list_of_the_wrong_length_is_still_one_line(cfg, capsys):
    err = _error_line(capsys, "fit", "--config", cfg, "--data.init_args.split", "0.5,0.5")
    assert "'data.init_args.split'" in err and "0.5" in err


@pytest.mark.parametrize("argv,hint", [
    (["export", "--ckpt_pth", "x.ckpt", "--out", "o"], "did you mean 'ckpt_path'?"),
    (["data", "align", "--imgs", "x", "--out", "o"], "did you mean 'images'?"),
    (["report"], "required: run_dir"),
])
def test_plain_verbs_answer_in_one_line(capsys, argv, hint):
    with pytest.raises(SystemExit) as exit_info:
        entry_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hint in err, err


def test_ckpt_path_help_says_what_best_and_last_do(capsys):
    for verb in ("fit", "test"):
        with pytest.raises(SystemExit):
            run_cli(verb, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "`best`" in text and "`last`" in text and "best.ckpt" in text, verb
        assert '"hpc"' not in text  # Lightning's own keywords are not mmtune's


def test_nearest_prefers_the_same_level_and_knows_other_tools_names():
    known = ["model.init_args.adapter.r", "model.init_args.adapter.alpha", "model.init_args.optimizer.lr",
             "trainer.max_epochs", "trainer.max_steps"]
    assert nearest("model.init_args.adapter.rank", known, "model.init_args") == "model.init_args.adapter.r"
    assert nearest("trainer.max_epoch", known) == "trainer.max_epochs"
    assert nearest("model.init_args.learning_rate", known, "model.init_args") == "model.init_args.optimizer.lr"
    assert nearest("model.init_args.zzz", known, "model.init_args") is None


def test_an_unknown_message_shape_is_still_one_line():
    assert one_line('Parser key "config":\n  something new\n  and more') == "--config: something new"


def test_take_verbose_leaves_lightnings_own_verbose_option():
    assert take_verbose(["fit", "--config", "c.yaml", "--verbose"]) == (["fit", "--config", "c.yaml"], True)
    assert take_verbose(["test", "--verbose", "false"]) == (["test", "--verbose", "false"], False)

"""The command line: help, usage messages, the config a run starts from, fast refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mimac.train
from mimac.cli import main
from mimac.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _captured_train(monkeypatch) -> list:
    """Replace the training itself: the CLI's chosen config is recorded instead."""
    seen: list = []
    monkeypatch.setattr(mimac.train, "train", lambda cfg, resume=None: seen.append(cfg))
    return seen


@pytest.mark.parametrize("method", ["crlc", "imc_swav", "dec_contrastive"])
def test_train_picks_the_tuned_config_of_the_chosen_method(method: str, monkeypatch, capsys) -> None:
    seen = _captured_train(monkeypatch)
    args = ["train"] if method == "crlc" else ["train", f"method={method}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{method}_digits.yaml (tuned for {method} on digits" in out
    assert seen == [load_config(REPO / "configs" / f"{method}_digits.yaml")]


def test_train_without_a_tuned_config_warns_loudly(monkeypatch, capsys) -> None:
    seen = _captured_train(monkeypatch)
    assert main(["train", "data.name=mnist", "method=dec_contrastive"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("WARNING: no tuned config") and "dec_contrastive_mnist.yaml" in err
    assert seen[0].method == "dec_contrastive" and seen[0].data.name == "mnist"


def test_train_help_lists_keys_methods_datasets(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for needle in ("optim.lr", "crlc.temperature", "data.root", "imc_swav.prototypes",
                   "crlc, imc_swav, dec_contrastive",
                   "digits, fashion_mnist, mnist, cifar10, cifar20, stl10, folder", "crlc_digits",
                   "$MIMAC_DATA"):
        assert needle in out, needle


def test_eval_without_arguments_asks_for_the_run_folder_only(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval"])
    err = capsys.readouterr().err
    assert "required: run_dir" in err and "key=value" not in err.split("error:")[1]


def test_a_mistyped_key_is_refused_before_torch_loads() -> None:
    code = ("import sys; from mimac.cli import main; rc = main(['train', 'optim.lrr=0.1']); "
            "print(rc, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert "unknown config key 'optim.lrr'" in res.stderr and "did you mean 'lr'" in res.stderr


def test_hints_name_keys_the_command_line_accepts(tmp_path: Path, capsys) -> None:
    """Every hint of a data error names a key that `mimac train` takes as it is written."""
    assert main(["train", "data.name=folder", "progress=false", "device=cpu",
                 f"runs_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "set data.root=<your image folder>" in err
    key = err.split("set ")[1].split("=")[0]
    assert load_config(None, [f"{key}=x", "data.name=folder"]).data.root == "x"

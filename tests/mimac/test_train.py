"""Trainer: smoke run, exact resume, corrupt checkpoints, NaN loss, bad data, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mimac import checkpoint as ckpt_mod
from mimac.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mimac.cli import main
from mimac.config import load_config
from mimac.models.crlc import CRLC
from mimac.runlog import read_metrics
from mimac.train import NonFiniteLossError, format_metrics, lr_factor, train

#: A tiny, fast CRLC on digits (a couple of seconds per run on one core).
TINY = ["model.width=8", "crlc.heads=2", "crlc.hidden_dim=32", "crlc.proj_dim=16", "batch_size=300",
        "eval_every=1", "progress=false", "threads=1", "device=cpu"]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, TINY + [f"run_dir={run_dir}", *extra])


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt_last.pt", weights_only=False)["model"]


def _same_result(a: dict, b: dict) -> None:
    for k in ("acc", "nmi", "ari", "head", "head_scores", "cluster_sizes", "per_head"):
        assert a[k] == b[k], k


def test_smoke_run_writes_everything(tmp_path: Path) -> None:
    run = tmp_path / "run"
    final = train(_cfg(run, "epochs=2"), log=lambda s: None)
    for name in ("config.yaml", "metrics.csv", "final_metrics.json", "ckpt_last.pt", "ckpt_prev.pt",
                 "predictions.npy", "loss_curves.png", "scores.png", "confusion.png",
                 "cluster_sizes.png"):
        assert (run / name).exists(), name
    saved = json.loads((run / "final_metrics.json").read_text())
    assert saved["split"] == "all" and saved["device"] == "cpu" and saved["num_heads"] == 2
    assert 0 <= saved["acc"] <= 1 and 0 <= saved["mean_nmi"] <= 1 and saved["head"] in (0, 1)
    assert "no labels" in saved["head_selection"] and saved["mapping"] == "hungarian"
    assert saved["acc"] == final["acc"] and len(saved["per_head"]["acc"]) == 2
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss_total", "loss_feature", "loss_prob", "loss_entropy", "images_per_s", "acc"} <= set(rows[0])
    assert sum(saved["cluster_sizes"]) == 1797
    assert saved["bf16"] is False  # not applied on a CPU, and recorded so
    assert "bf16: false" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_unbroken_run(tmp_path: Path, schedule: str) -> None:
    extra = ["epochs=3", f"optim.schedule={schedule}", "optim.warmup_epochs=1"]
    straight = train(_cfg(tmp_path / "a", *extra), log=lambda s: None)
    # "killed" after epoch 1 (its checkpoint written), then resumed from the folder
    assert train(_cfg(tmp_path / "b", *extra), stop_after_epoch=1, log=lambda s: None) is None
    assert load_checkpoint(tmp_path / "b")[0]["epoch"] == 1
    resumed = train(load_config(tmp_path / "b" / "config.yaml"), resume=tmp_path / "b",
                    log=lambda s: None)
    _same_result(straight, resumed)
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [r["epoch"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]


def test_extend_finished_run_equals_longer_run(tmp_path: Path) -> None:
    """epochs=2 then resume with epochs=3 == straight epochs=3 (constant schedule)."""
    straight = train(_cfg(tmp_path / "a", "epochs=3"), log=lambda s: None)
    train(_cfg(tmp_path / "b", "epochs=2"), log=lambda s: None)
    assert main(["train", f"resume={tmp_path / 'b'}", "epochs=3"]) == 0
    resumed = json.loads((tmp_path / "b" / "final_metrics.json").read_text())
    _same_result(straight, resumed)
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(run, "epochs=2"), log=lambda s: None)
    (run / "ckpt_last.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        state, path = load_checkpoint(run)
    assert path.name == "ckpt_prev.pt" and state["epoch"] == 1
    assert (run / "ckpt_last.pt.corrupt").exists() and not (run / "ckpt_last.pt").exists()
    # resuming continues from epoch 1 and finishes normally
    final = train(load_config(run / "config.yaml"), resume=run, log=lambda s: None)
    assert load_checkpoint(run)[0]["epoch"] == 2 and 0 <= final["acc"] <= 1
    # both files unreadable: a clear error
    for name in ("ckpt_last.pt", "ckpt_prev.pt"):
        (run / name).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_checkpoint(run)


def test_failed_save_keeps_previous_checkpoints(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, {"epoch": 1, "model": {}, "optimizer": {}, "rng": {}})
    save_checkpoint(tmp_path, {"epoch": 2, "model": {}, "optimizer": {}, "rng": {}})

    def broken_save(obj, f):  # a write that dies half-way (disk full, killed ...)
        f.write(b"PK\x03\x04 truncated")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="previous checkpoints are kept"):
        save_checkpoint(tmp_path, {"epoch": 3, "model": {}, "optimizer": {}, "rng": {}})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[0]["epoch"] == 2
    assert torch.load(tmp_path / "ckpt_prev.pt", weights_only=False)["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_nan_loss_stops_with_step_and_saves_nothing_broken(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    original = CRLC.losses

    def poisoned(self, views, group=None):
        terms = original(self, views, group)
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 3:  # 5 steps per epoch (1797 // 300): epoch 3, step 3
            terms["total"] = terms["total"] * math.nan
        return terms

    monkeypatch.setattr(CRLC, "losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 3/5"):
        train(_cfg(run, "epochs=4"), log=lambda s: None)
    state, path = load_checkpoint(run)
    assert path.name == "ckpt_last.pt" and state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "final_metrics.json").exists()


def test_bad_data_path_is_reported(tmp_path: Path, capsys) -> None:
    code = main(["train", *TINY, f"run_dir={tmp_path / 'r'}", "data.name=fashion_mnist",
                 f"data.root={tmp_path / 'nowhere'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and "nowhere" in err
    assert main(["train", "epochs=zero"]) == 2
    assert "'epochs' expects int" in capsys.readouterr().err


def test_cli_eval_recomputes_metrics(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    final = train(_cfg(run, "epochs=1"), log=lambda s: None)
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"ACC {final['acc']:.4f}" in out
    again = json.loads((run / "eval_metrics.json").read_text())
    _same_result(final, again)
    assert main(["eval", str(tmp_path / "nope")]) == 2


def test_resume_refuses_keys_it_cannot_honour(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(_cfg(run, "epochs=1"), log=lambda s: None)
    saved = (run / "config.yaml").read_text()
    assert main(["train", f"resume={run}", "optim.lr=0.5"]) == 2
    assert "'optim.lr' cannot change on resume" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == saved  # nothing recorded that did not happen
    assert main(["train", f"resume={run}", "epochs=2", "progress=false"]) == 0
    assert load_checkpoint(run)[0]["epoch"] == 2


def test_over_clustering_reports_the_majority_mapping(tmp_path: Path) -> None:
    final = train(_cfg(tmp_path / "run", "epochs=1", "model.num_clusters=20", "data.limit=300"),
                  log=lambda s: None)
    assert final["mapping"] == "majority"
    assert "majority mapping" in format_metrics(final)


def test_lr_schedules() -> None:
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_epochs=2"]).optim
    assert lr_factor(cfg, 10, 1.0) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(cfg, 10, 2.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 10.0) == pytest.approx(0.0, abs=1e-9)
    step = load_config(None, ["optim.schedule=step", "optim.milestones=[3, 6]"]).optim
    assert [lr_factor(step, 10, t) for t in (0, 3, 7)] == pytest.approx([1, 0.1, 0.01])


def test_tensorboard_events_when_available(tmp_path: Path, monkeypatch) -> None:
    """With ``torch.utils.tensorboard`` importable, every numeric column becomes a scalar."""
    import sys
    import types

    logged: list[tuple[str, float, int]] = []

    class FakeWriter:
        def __init__(self, logdir: str, purge_step: int | None = None) -> None:
            self.logdir = logdir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            logged.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    from mimac.runlog import RunLog

    log = RunLog(tmp_path)
    log.append({"epoch": 1, "loss_total": 2.5, "acc": float("nan"), "images_per_s": 10.0})
    log.close()
    assert ("loss/total", 2.5, 1) in logged and ("images_per_s", 10.0, 1) in logged
    assert not any(tag == "acc" for tag, _, _ in logged)  # NaN (not evaluated) is skipped

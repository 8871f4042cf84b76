"""Data-parallel training on gloo CPU ranks: one DDP step of every method equals one process
on the whole batch; a torchrun run on digits writes one run folder; its resume is exact."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mimac.config import load_config, resolve_run_config
from mimac.models import build_method
from mimac.runlog import read_metrics
from mimac.train import _StepLosses, train
from tests.ranks import run_ranks

GLOBAL_BATCH = 12
#: Small models of each method on 8x8 one-channel images (10 clusters).
METHOD_ARGS = {
    "crlc": ["crlc.heads=2", "crlc.hidden_dim=16", "crlc.proj_dim=8"],
    "imc_swav": ["imc_swav.hidden_dim=16", "imc_swav.proj_dim=8", "imc_swav.prototypes=20",
                 "imc_swav.classifier_hidden=16", "imc_swav.small_crops=1",
                 "imc_swav.small_size=5"],
    "dec_contrastive": ["dec_contrastive.hidden_dim=16", "dec_contrastive.proj_dim=8"],
}


def _method(name: str, extra: tuple[str, ...] = ()) -> nn.Module:
    cfg = load_config(None, [f"method={name}", "model.width=4", "kernel_backend=torch",
                             *METHOD_ARGS[name], *extra])
    torch.manual_seed(0)
    method = build_method(cfg, 1, 8, 10)
    method.on_epoch_start(1)
    # Eval-mode batch norm: its statistics are the one per-rank coupling DDP leaves to
    # SyncBatchNorm (CUDA only); everything else must match the single process exactly.
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    if name == "dec_contrastive":  # centres as if k-means had run, so every term trains
        with torch.no_grad():
            method.centres.copy_(torch.randn(method.centres.shape, generator=torch.Generator().manual_seed(1)))
            method.centres_ready.fill_(True)
    return method


def _views(method) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    sizes = [dict(spec.overrides).get("size", 8) for spec in method.view_specs()]
    return [torch.rand(GLOBAL_BATCH, 1, s, s, generator=g) for s in sizes]


def _step_worker(rank: int, world: int, init_file: str, out_dir: str, name: str, use_group: bool,
                 extra: tuple[str, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_ddp_step_on_rank(rank, world, name, use_group, extra),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # the DDP module must go before its process group (see mimac.distributed.leave)
        dist.destroy_process_group()


def _ddp_step_on_rank(rank: int, world: int, name: str, use_group: bool,
                      extra: tuple[str, ...]) -> dict:
    torch.set_num_threads(1)
    method = _method(name, extra)
    local = GLOBAL_BATCH // world
    views = [v[rank * local:(rank + 1) * local] for v in _views(method)]
    ddp = nn.parallel.DistributedDataParallel(
        _StepLosses(method, dist.group.WORLD if use_group else None),
        find_unused_parameters=method.may_skip_parameters())
    terms = ddp(views)
    terms["total"].backward()
    total = terms["total"].detach().clone()
    dist.all_reduce(total)
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    return {"total": total / world, "grads": grads}


def _ddp_step(tmp_path: Path, name: str, world: int, use_group: bool = True,
              extra: tuple[str, ...] = ()) -> list[dict]:
    run_ranks(_step_worker, world, (str(tmp_path / "init"), str(tmp_path), name, use_group, extra))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _single_step(name: str, order: torch.Tensor | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One process on the whole batch (rows in ``order``, if given: the same loss)."""
    method = _method(name, extra)
    views = _views(method)
    terms = method.losses([v[order] for v in views] if order is not None else views)
    terms["total"].backward()
    return {"total": terms["total"].detach(),
            "grads": {k: p.grad for k, p in method.named_parameters() if p.grad is not None}}


def _rounding_noise(name: str, single: dict) -> float:
    """How far float32 rounding alone moves the gradient: the same batch in other row
    orders (every loss is invariant to the order of its rows)."""
    orders = [torch.randperm(GLOBAL_BATCH, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    return max(_grad_err(_single_step(name, o)["grads"], single["grads"]) for o in orders)


def _grad_err(got: dict, want: dict) -> float:
    """Largest gradient difference relative to the largest gradient entry of the model
    (per-tensor scales would be dominated by rounding where a small gradient, such as
    that of a bias before a normalisation, is a sum of cancelling terms)."""
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


@pytest.mark.parametrize(("name", "world"), [("crlc", 2), ("crlc", 3), ("imc_swav", 2),
                                             ("dec_contrastive", 3)])
def test_ddp_step_equals_one_process_on_the_whole_batch(tmp_path: Path, name: str, world: int) -> None:
    single = _single_step(name)
    bound = 5 * _rounding_noise(name, single)  # seen: DDP at 1-3x the reordering noise
    for r in _ddp_step(tmp_path, name, world):  # DDP leaves every rank the same averaged gradient
        torch.testing.assert_close(r["total"], single["total"], rtol=1e-5, atol=1e-6)
        assert _grad_err(r["grads"], single["grads"]) <= bound
    # The control: rank-local batch statistics (no group) are far outside the bound, so
    # the check above tells a global loss from a local one.
    (tmp_path / "local").mkdir()
    local = _ddp_step(tmp_path / "local", name, world, use_group=False)
    assert _grad_err(local[0]["grads"], single["grads"]) > 20 * bound


def test_frozen_prototypes_get_no_gradient_under_ddp(tmp_path: Path) -> None:
    # IMC-SwAV's warm-up: the prototypes must stay out of the optimizer step on every rank
    # (a zero gradient would still move them through weight decay).
    extra = ("imc_swav.freeze_prototypes_epochs=1",)
    single = _single_step("imc_swav", extra=extra)
    assert "prototypes.weight" not in single["grads"]
    for r in _ddp_step(tmp_path, "imc_swav", 2, extra=extra):
        assert r["grads"].keys() == single["grads"].keys()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A short CRLC run on a digits subset: 2 epochs of 2 steps of 64 images per rank pair.
RUN = ["data.limit=256", "batch_size=128", "epochs=3", "eval_every=3", "model.width=4",
       "crlc.heads=2", "crlc.hidden_dim=16", "crlc.proj_dim=8", "progress=false", "threads=1",
       "device=cpu"]


def _train_worker(rank: int, world: int, port: int, overrides: list[str], stop: int | None) -> None:
    # torchrun's environment: train() joins and leaves the process group itself.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = resolve_run_config(None, overrides)[0]  # as `mimac train` resolves it
    train(cfg, stop_after_epoch=stop, log=lambda s: None)
    assert not dist.is_initialized()


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mimac", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_torchrun_run_writes_one_folder_and_resume_is_exact(tmp_path: Path) -> None:
    # The whole run under torchrun, through the `mimac` command line.
    out = _torchrun([*RUN, f"runs_root={tmp_path / 'runs'}"], tmp_path)
    assert out.returncode == 0, out.stderr[:6000]
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1, folders
    straight = folders[0]
    final = json.loads((straight / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["batch_size"] == 128 and 0 <= final["acc"] <= 1
    assert out.stdout.count("run folder:") == 1  # rank 0 alone reports
    # The same run "killed" after epoch 1, then resumed by torchrun from its folder.
    broken = tmp_path / "broken"
    run_ranks(_train_worker, 2, (_free_port(), [*RUN, f"run_dir={broken}"], 1))
    assert [r["epoch"] for r in read_metrics(broken)] == [1]
    out = _torchrun([f"resume={broken}"], tmp_path)
    assert out.returncode == 0, out.stderr[:6000]
    assert f"resuming {broken}" in out.stdout
    a = torch.load(straight / "ckpt_last.pt", weights_only=False)
    b = torch.load(broken / "ckpt_last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["world_size"] == b["world_size"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    resumed = json.loads((broken / "final_metrics.json").read_text())
    for k in ("acc", "nmi", "ari", "head", "cluster_sizes"):
        assert resumed[k] == final[k], k
    assert [r["loss_total"] for r in read_metrics(broken)] == [r["loss_total"] for r in read_metrics(straight)]


def test_batch_not_divisible_by_ranks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="divisible by the number of ranks"):
        run_ranks(_train_worker, 2, (_free_port(), [*RUN, "batch_size=127",
                                                    f"run_dir={tmp_path / 'r'}"], None), timeout=60)
    assert not (tmp_path / "r").exists()


def test_sync_batchnorm_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="sync_batchnorm=true needs CUDA"):
        run_ranks(_train_worker, 2, (_free_port(), [*RUN, "sync_batchnorm=true",
                                                    f"run_dir={tmp_path / 'r'}"], None), timeout=60)


@pytest.mark.parametrize("command", [["eval", "runs/x"], ["compare", "--dataset", "digits"]])
def test_other_commands_refuse_torchrun(monkeypatch, capsys, command: list[str]) -> None:
    from mimac.cli import EXIT_USAGE, main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == EXIT_USAGE
    assert "launch it without torchrun" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "match"), [
    ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK is not"),
    ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE must be an integer"),
])
def test_bad_torchrun_environment_is_named(monkeypatch, env: dict, match: str) -> None:
    from mimac.distributed import join

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        join("cpu")
    assert not dist.is_initialized()

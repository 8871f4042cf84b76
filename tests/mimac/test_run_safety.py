"""Run safety: verified checkpoint loads, atomic run files, divergence, refused resumes,
one-line errors for unwritable files, removal of interrupted writes' leftovers.

Faults are injected at the level every writer shares (``open``), so each test
reproduces its failure on any implementation of the writers.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mimac.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mimac.cli import main
from mimac.config import load_config
from mimac.models.crlc import CRLC
from mimac.train import train

#: A tiny CRLC on 300 digits (about a second per run on one core); 3 steps per epoch.
TINY = ["model.width=8", "crlc.heads=2", "crlc.hidden_dim=32", "crlc.proj_dim=16", "batch_size=100",
        "data.limit=300", "eval_every=1", "progress=false", "threads=1", "device=cpu",
        "kernel_backend=torch"]
STEPS = 3
REPO = Path(__file__).resolve().parents[2]


def _quiet(_: str) -> None:
    pass


def _run(run_dir: Path, *extra: str) -> dict:
    out = train(load_config(None, TINY + [f"run_dir={run_dir}", *extra]), log=_quiet)
    assert out is not None
    return out


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _rewrite(path: Path, edit) -> None:
    """Re-save a checkpoint file with ``edit(state)`` applied (bypassing every check)."""
    state = _state(path)
    edit(state)
    torch.save(state, path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("mimac ")]
    assert len(lines) == 1, err
    return lines[0]


class _FailingFile:
    """A real, already truncated file whose writes fail like a full or read-only disk."""

    def __init__(self, f, code: int) -> None:
        self._f, self._code = f, code

    def _fail(self, *args, **kwargs):
        raise OSError(self._code, os.strerror(self._code))

    write = writelines = _fail

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def fail_writes(monkeypatch, name: str, code: int = errno.ENOSPC, at_open: bool = False) -> None:
    """Every file opened for writing whose name contains ``name`` is truncated, then its
    writes raise ``OSError(code)`` (or the open itself, with ``at_open``)."""
    real_open = builtins.open

    def patched(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and name in Path(file).name and (
                set(mode) & set("wax+")):
            if at_open:
                raise OSError(code, os.strerror(code), str(file))
            return _FailingFile(real_open(file, mode, *args, **kwargs), code)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", patched)
    monkeypatch.setattr(io, "open", patched)


# ---- 1. verified checkpoint loads -----------------------------------------------------

def _flip_byte_in_record(path: Path, record_suffix: str = "data/0") -> None:
    """Flip one byte in the middle of a tensor record's stored data (not its header)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(record_suffix))
    local = info.header_offset
    name_len = int.from_bytes(raw[local + 26:local + 28], "little")
    extra_len = int.from_bytes(raw[local + 28:local + 30], "little")
    start = local + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_bit_flip_in_a_weight_record_falls_back_to_previous(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")
    _flip_byte_in_record(run / "ckpt_last.pt")
    with pytest.warns(RuntimeWarning, match=r"ckpt_last\.pt.*CRC"):
        state, path = load_checkpoint(run, quarantine=False)
    assert path.name == "ckpt_prev.pt" and state["epoch"] == 1
    # the command line resumes from the previous checkpoint and says so
    with pytest.warns(RuntimeWarning, match=r"ckpt_last\.pt.*CRC"):
        assert main(["train", f"resume={run}", "epochs=2"]) == 0
    assert (run / "ckpt_last.pt.corrupt").exists()
    assert _state(run / "ckpt_last.pt")["epoch"] == 2


def test_non_finite_checkpoint_is_not_loaded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")

    def poison(state: dict) -> None:
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name][0] = math.nan

    _rewrite(run / "ckpt_last.pt", poison)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        state, path = load_checkpoint(run, quarantine=False)
    assert path.name == "ckpt_prev.pt" and state["epoch"] == 1


def test_checkpoint_with_wrong_shapes_falls_back(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")

    def reshape(state: dict) -> None:
        name = next(k for k, v in state["model"].items() if v.dim() == 2)
        state["model"][name] = torch.zeros(3, 3)

    _rewrite(run / "ckpt_last.pt", reshape)
    with pytest.warns(RuntimeWarning, match=r"ckpt_last\.pt.*size mismatch"):
        assert main(["train", f"resume={run}", "epochs=2"]) == 0
    assert _state(run / "ckpt_last.pt")["epoch"] == 2
    # both unusable: one error naming both files, not a traceback
    _rewrite(run / "ckpt_last.pt", reshape)
    _rewrite(run / "ckpt_prev.pt", reshape)
    with pytest.warns(RuntimeWarning):
        assert main(["train", f"resume={run}", "epochs=2"]) == 1
    line = _error_line(capsys)
    assert "ckpt_last.pt" in line and "ckpt_prev.pt" in line and "size mismatch" in line


def _blow_up(state: dict) -> None:
    """Finite weights that overflow float32 in the first forward pass."""
    for v in state["model"].values():
        if v.is_floating_point() and v.dim() > 1:
            v.mul_(1e30)


def test_weights_that_diverge_at_once_fall_back_and_name_the_file(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")
    _rewrite(run / "ckpt_last.pt", _blow_up)
    with pytest.warns(RuntimeWarning, match=r"ckpt_last\.pt.*first step"):
        assert main(["train", f"resume={run}", "epochs=3"]) == 0
    assert _state(run / "ckpt_last.pt")["epoch"] == 3
    # no good checkpoint left: the message names the file, not the learning rate
    _rewrite(run / "ckpt_last.pt", _blow_up)
    _rewrite(run / "ckpt_prev.pt", _blow_up)
    with pytest.warns(RuntimeWarning):
        assert main(["train", f"resume={run}", "epochs=4"]) == 1
    line = _error_line(capsys)
    assert "ckpt_prev.pt" in line and "optim.lr" not in line


def test_later_divergence_after_resume_is_not_blamed_on_the_checkpoint(tmp_path: Path,
                                                                        monkeypatch) -> None:
    from mimac.train import NonFiniteLossError

    run = tmp_path / "run"
    _run(run, "epochs=1")
    calls = {"n": 0}
    original = CRLC.losses

    def poisoned(self, views, group=None):
        terms = original(self, views, group)
        calls["n"] += 1
        if calls["n"] == STEPS + 1:  # the second epoch after the resume, step 1
            terms["total"] = terms["total"] * math.nan
        return terms

    monkeypatch.setattr(CRLC, "losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 3, step 1"):
        train(load_config(run / "config.yaml", ["epochs=3"]), resume=run, log=_quiet)
    assert _state(run / "ckpt_last.pt")["epoch"] == 2
    assert not (run / "ckpt_last.pt.corrupt").exists()


def test_full_disk_while_saving_a_checkpoint_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")
    before = (run / "ckpt_last.pt").read_bytes(), (run / "ckpt_prev.pt").read_bytes()
    fail_writes(monkeypatch, "ckpt_last.pt")
    assert main(["train", f"resume={run}", "epochs=3"]) == 1
    line = _error_line(capsys)
    assert "No space left on device" in line and "checkpoint" in line
    monkeypatch.undo()
    assert ((run / "ckpt_last.pt").read_bytes(), (run / "ckpt_prev.pt").read_bytes()) == before
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


_WITH_FILE_SIZE_LIMIT = """
import resource, signal, sys
from mimac.cli import main
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG), like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def test_real_write_failure_of_a_checkpoint_names_the_cause(tmp_path: Path) -> None:
    """A checkpoint larger than the process may write (the kernel refuses the write as on a
    full disk): the error says so instead of torch's 'unexpected pos'."""
    run = tmp_path / "run"
    _run(run, "epochs=2")
    before = (run / "ckpt_last.pt").read_bytes(), (run / "ckpt_prev.pt").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, str(len(before[0]) // 2),
                           "train", f"resume={run}", "epochs=3"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mimac train: error:")]
    assert len(lines) == 1 and os.strerror(errno.EFBIG) in lines[0], proc.stderr
    assert ((run / "ckpt_last.pt").read_bytes(), (run / "ckpt_prev.pt").read_bytes()) == before
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


# ---- 2. config.yaml ---------------------------------------------------------------

@pytest.mark.parametrize(("code", "at_open"), [(errno.ENOSPC, False), (errno.EROFS, True)])
def test_config_write_failure_keeps_the_config(tmp_path: Path, monkeypatch, capsys, code: int,
                                               at_open: bool) -> None:
    """Full disk (truncated, then the write fails) or read-only folder at the rewrite on resume."""
    run = tmp_path / "run"
    _run(run, "epochs=1")
    saved = (run / "config.yaml").read_text()
    fail_writes(monkeypatch, "config.yaml", code, at_open=at_open)
    assert main(["train", f"resume={run}", "epochs=2"]) == 1
    line = _error_line(capsys)
    assert "config.yaml" in line and os.strerror(code) in line
    monkeypatch.undo()
    assert (run / "config.yaml").read_text() == saved


_KILL_IN_CONFIG_WRITE = """
import builtins, io, os, signal, sys
from pathlib import Path
from mimac.cli import main
real_open = builtins.open
def killing_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and "config.yaml" in Path(file).name and "w" in mode:
        os.kill(os.getpid(), signal.SIGKILL)  # truncated, nothing written yet
    return f
builtins.open = io.open = killing_open
sys.exit(main(sys.argv[1:]))
"""


def test_kill_between_truncate_and_write_of_config(tmp_path: Path) -> None:
    """SIGKILL right after config.yaml is opened for writing: the config survives, the
    next start removes the temporary file and the run resumes with its own config."""
    run = tmp_path / "run"
    _run(run, "epochs=2")
    saved = (run / "config.yaml").read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_CONFIG_WRITE, "train", f"resume={run}",
                           "epochs=3"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "config.yaml").read_text() == saved
    assert main(["train", f"resume={run}", "epochs=3"]) == 0
    assert load_config(run / "config.yaml").data.limit == 300
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_resume_with_a_config_that_disagrees_with_the_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")
    (run / "config.yaml").write_text("")  # as left by a kill during the old non-atomic write
    assert main(["train", f"resume={run}", "epochs=3"]) == 2
    line = _error_line(capsys)
    assert "data.limit" in line and "model.width" in line and "ckpt_last.pt" in line
    assert (run / "config.yaml").read_text() == ""  # nothing overwritten
    assert _state(run / "ckpt_last.pt")["epoch"] == 2
    assert not (run / "ckpt_last.pt.corrupt").exists()  # a usage error, not a damaged file


# ---- 3. divergence ----------------------------------------------------------------

def test_exploding_loss_stops_the_run(tmp_path: Path, capsys) -> None:
    """Adam at lr=1e6 reaches losses of 1e24 without a NaN: stopped, nothing saved."""
    run = tmp_path / "run"
    code = main(["train", *TINY, f"run_dir={run}", "epochs=2", "optim.lr=1e6"])
    assert code == 1
    line = _error_line(capsys)
    assert "diverged" in line and "epoch 1" in line
    assert not (run / "ckpt_last.pt").exists() and not (run / "final_metrics.json").exists()


def test_first_fault_of_an_epoch_is_reported(tmp_path: Path, monkeypatch) -> None:
    """The step losses are checked at the end of the epoch, in order: an explosion at step 2
    is reported as such, not the NaN it leads to at step 3."""
    from mimac.divergence import DivergenceError

    calls = {"n": 0}
    original = CRLC.losses

    def poisoned(self, views, group=None):
        terms = original(self, views, group)
        calls["n"] += 1
        if calls["n"] == STEPS + 2:  # epoch 2, step 2: finite but exploded
            terms["total"] = terms["total"] * 1e12
        elif calls["n"] == STEPS + 3:
            terms["total"] = terms["total"] * math.nan
        return terms

    monkeypatch.setattr(CRLC, "losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"epoch 2, step 2/3.*times the recent losses") as exc:
        _run(run, "epochs=2")
    assert (exc.value.epoch, exc.value.step) == (2, 2)
    assert _state(run / "ckpt_last.pt")["epoch"] == 1


def test_nan_from_the_last_step_is_not_saved(tmp_path: Path, monkeypatch) -> None:
    from mimac.divergence import DivergenceError

    calls = {"n": 0}
    original = CRLC.after_step

    def poisoned(self) -> None:
        original(self)
        calls["n"] += 1
        if calls["n"] == 2 * STEPS:  # the last optimizer step of epoch 2
            with torch.no_grad():
                next(self.parameters()).fill_(math.nan)

    monkeypatch.setattr(CRLC, "after_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match="epoch 2"):
        _run(run, "epochs=2")
    state = _state(run / "ckpt_last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "final_metrics.json").exists()


def test_collapsed_clustering_is_flagged(tmp_path: Path, monkeypatch, capsys) -> None:
    def one_cluster(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.zeros(self.num_heads, x.shape[0], self.num_clusters)
        probs[..., 0] = 1.0
        return probs

    monkeypatch.setattr(CRLC, "cluster_probs", one_cluster)
    run = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run}", "epochs=1"]) == 0
    saved = json.loads((run / "final_metrics.json").read_text())
    assert saved["collapsed"] is True and "one cluster" in saved["warnings"][0]
    assert "WARNING: collapsed clustering" in capsys.readouterr().out


def test_loss_monitor_tolerates_normal_changes() -> None:
    from mimac.divergence import DivergenceError, LossMonitor

    mon = LossMonitor()
    for v in [10.0, 8.0, 12.0, -3.0, 50.0, 0.5, 5.0]:
        mon.check(v, 1, 1, 1)
    with pytest.raises(DivergenceError, match="times the recent losses"):
        mon.check(1e9, 2, 1, 1)
    assert LossMonitor(mon.state()).history == mon.history  # restored on resume


@pytest.mark.parametrize("lr", ["1e300", ".inf", "1e38"])
def test_unrepresentable_learning_rate_is_refused(lr: str, capsys) -> None:
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, [f"optim.lr={lr}"])
    assert main(["train", f"optim.lr={lr}", "device=cpu"]) == 2
    assert "optim.lr" in _error_line(capsys)
    load_config(None, ["optim.lr=1e30", "optim.name=sgd"])  # large but representable


# ---- 4. resume with fewer epochs --------------------------------------------------

def test_resume_with_fewer_epochs_than_the_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=2")
    files = {n: (run / n).read_bytes() for n in ("final_metrics.json", "config.yaml", "metrics.csv")}
    assert main(["train", f"resume={run}", "epochs=1"]) == 2
    line = _error_line(capsys)
    assert "epoch 2" in line and "epochs=1" in line
    assert {n: (run / n).read_bytes() for n in files} == files


# ---- 5. one-line errors -------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_kernel_backend_is_refused_before_the_run_folder(tmp_path: Path,
                                                                     capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run}", "epochs=1", "kernel_backend=cuda"]) == 2
    assert "kernel_backend" in _error_line(capsys)
    assert not run.exists()


def test_run_dir_that_cannot_be_created(tmp_path: Path, capsys) -> None:
    assert main(["train", *TINY, "run_dir=/dev/null/x", "epochs=1"]) == 1
    line = _error_line(capsys)
    assert "/dev/null/x" in line and "Not a directory" in line


def test_read_only_runs_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", *TINY, f"runs_root={tmp_path / 'ro'}", "epochs=1"]) == 1
    line = _error_line(capsys)
    assert "Read-only file system" in line and str(tmp_path / "ro") in line


def test_read_only_eval_output(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=1")
    fail_writes(monkeypatch, "eval_metrics", errno.EROFS, at_open=True)
    assert main(["eval", str(run)]) == 1
    line = _error_line(capsys)
    assert "eval_metrics.json" in line and "Read-only file system" in line


@pytest.mark.parametrize("name", ["final_metrics.json", "predictions.npy", "metrics.csv"])
def test_full_disk_while_writing_results(tmp_path: Path, monkeypatch, capsys, name: str) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=1")
    before = (run / name).read_bytes()
    fail_writes(monkeypatch, name)
    assert main(["train", f"resume={run}", "epochs=2"]) == 1
    line = _error_line(capsys)
    assert name in line and "No space left on device" in line
    monkeypatch.undo()
    assert (run / name).read_bytes() == before
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_failed_plot_does_not_fail_a_finished_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    fail_writes(monkeypatch, "loss_curves.png")
    assert main(["train", *TINY, f"run_dir={run}", "epochs=1"]) == 0
    assert "plots skipped" in capsys.readouterr().out
    monkeypatch.undo()
    assert (run / "final_metrics.json").exists() and (run / "scores.png").exists()
    assert not (run / "loss_curves.png").exists()


def test_garbage_metrics_csv_is_named(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=1")
    (run / "metrics.csv").write_text("not,a\nmetrics,table\n")
    assert main(["train", f"resume={run}", "epochs=2"]) == 2
    line = _error_line(capsys)
    assert "metrics.csv" in line and "'epoch'" in line
    assert _state(run / "ckpt_last.pt")["epoch"] == 1
    (run / "metrics.csv").unlink()  # as the message suggests: the run continues
    assert main(["train", f"resume={run}", "epochs=2"]) == 0


# ---- 6. leftovers -----------------------------------------------------------------

def test_leftovers_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, "epochs=1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [f".ckpt_last.pt.tmp-{dead.pid}", ".final_metrics.json.tmp", ".metrics.csv.tmp",
                 f".config.yaml.tmp-{dead.pid}.yaml"]
    for name in leftovers:
        (run / name).write_bytes(b"\0" * 64)
    (run / "notes.tmp").write_text("a file of the user's")
    assert main(["train", f"resume={run}", "epochs=2"]) == 0
    assert not [n for n in leftovers if (run / n).exists()]
    assert (run / "notes.tmp").exists()


def test_save_refuses_non_finite_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"epoch": 1, "model": {"w": torch.ones(2)}, "optimizer": {}, "rng": {}})
    with pytest.raises(CheckpointError, match=r"non-finite values \(in model\.w\)"):
        save_checkpoint(tmp_path, {"epoch": 2, "model": {"w": torch.tensor([1.0, math.inf])},
                                   "optimizer": {}, "rng": {}})
    assert load_checkpoint(tmp_path)[0]["epoch"] == 1


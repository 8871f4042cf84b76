"""`mimac compare`: a tiny three-method comparison writes table, plot and JSON; reuse of
finished runs; the CLI; errors; the summary arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mimac.cli import main
from mimac.compare import BASELINE, format_table, run_compare, summarise

#: One epoch of small networks on 300 digits: about a second per run.
TINY = ["epochs=1", "data.limit=300", "batch_size=100", "eval_every=1", "model.width=4",
        "device=cpu", "threads=1", "crlc.heads=2", "crlc.hidden_dim=16", "crlc.proj_dim=8",
        "imc_swav.prototypes=10", "imc_swav.classifier_hidden=16", "imc_swav.small_crops=1",
        "imc_swav.proj_dim=8", "dec_contrastive.proj_dim=8", "dec_contrastive.hidden_dim=16",
        "dec_contrastive.kmeans_restarts=1", "dec_contrastive.pretrain_epochs=0"]


def test_compare_three_methods_writes_table_plot_json(tmp_path: Path) -> None:
    logs: list[str] = []
    res = run_compare("digits", [0, 1], ("crlc", "imc_swav", "dec_contrastive"), tmp_path, TINY,
                      log=logs.append)
    table = (tmp_path / "compare_digits.md").read_text()
    assert (tmp_path / "compare_digits.png").stat().st_size > 1000
    data = json.loads((tmp_path / "compare_digits.json").read_text())
    assert set(data["summary"]) == {"crlc", "imc_swav", "dec_contrastive", BASELINE}
    assert all(s["n"] == 2 for s in data["summary"].values())
    for m in ("crlc", "imc_swav", "dec_contrastive"):
        assert f"| {m} | 2 | 1 |" in table
        for seed in (0, 1):
            run = tmp_path / "runs" / f"{m}-seed{seed}"
            assert json.loads((run / "final_metrics.json").read_text())["seed"] == seed
    assert all(r["num_images"] == 300 for r in res["runs"])  # data.limit reached every run
    assert "± " in table and "data.limit=300" in table and "images/s" in table
    # A second call reuses the finished runs instead of training again.
    logs.clear()
    again = run_compare("digits", [0, 1], ("crlc", "imc_swav", "dec_contrastive"), tmp_path, TINY,
                        baseline=False, log=logs.append)
    assert sum("reusing" in line for line in logs) == 6
    assert [r["acc"] for r in again["runs"]] == [r["acc"] for r in res["runs"][:6]]
    # ...but never under another config: the table would show results of other settings.
    with pytest.raises(ValueError, match="differing keys: data.limit, epochs"):
        run_compare("digits", [0], ("crlc",), tmp_path, [*TINY, "epochs=2", "data.limit=200"],
                    baseline=False, log=logs.append)


def test_compare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    # key=value typed right after --seeds/--methods must still be taken as overrides
    argv = ["compare", "--dataset", "digits", "--out", str(out), "--methods", "crlc",
            "--seeds", "3", *TINY]
    assert main(argv) == 0
    assert "| crlc | 1 |" in (out / "compare_digits.md").read_text()
    assert main(["compare", "--dataset", "digits", "--methods", "nope", "--out", str(out)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["compare", "--dataset", "cifar10", "--methods", "crlc", "--out", str(out),
                 "--config-dir", str(tmp_path)]) == 2
    assert "crlc_cifar10.yaml is missing" in capsys.readouterr().err
    assert main(["compare", "--seeds", "a", "--out", str(out)]) == 2


def test_summary_mean_and_sample_std() -> None:
    runs = [{"method": "m", "seed": s, "acc": a, "nmi": 0.5, "ari": 0.4, "train_time_s": t,
             "images_per_s": 100.0 * (s + 1), "epochs": 5, "split": "all", "num_images": 10,
             "device": "cpu", "device_name": "x", "threads": 1}
            for s, (a, t) in enumerate([(0.8, 10.0), (0.9, 14.0), (1.0, 12.0)])]
    s = summarise(runs)["m"]
    assert s["acc_mean"] == pytest.approx(0.9) and s["acc_std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert s["train_time_s_mean"] == pytest.approx(12.0) and s["images_per_s"] == pytest.approx(200.0)
    table = format_table("toy", runs, {"m": s})
    assert "| m | 3 | 5 | 0.9000 ± 0.1000 | 0.5000 ± 0.0000 | 0.4000 ± 0.0000 | 12.0 ± 2.0 | 200 |" in table


@pytest.mark.parametrize("method", ["imc_swav", "dec_contrastive"])
@pytest.mark.parametrize("dataset,channels,size", [
    ("digits", 1, 8), ("fashion_mnist", 1, 28), ("cifar10", 3, 32), ("cifar20", 3, 32),
    ("stl10", 3, 96),
])
def test_every_config_builds(method: str, dataset: str, channels: int, size: int) -> None:
    """The committed configs load and build at their dataset's image size (sizes fit)."""
    from mimac.compare import default_config_dir, method_config
    from mimac.config import load_config
    from mimac.models import build_method

    cfg = load_config(method_config(method, dataset, default_config_dir()))
    assert cfg.method == method and cfg.data.name == dataset
    k = cfg.model.num_clusters or 10
    assert build_method(cfg, channels, size, k).num_clusters == k


def test_table_says_when_acc_used_the_majority_mapping() -> None:
    runs = [{"method": m, "seed": 0, "acc": 0.5, "nmi": 0.5, "ari": 0.5, "train_time_s": 1.0,
             "images_per_s": None, "mapping": mapping}
            for m, mapping in (("crlc", "majority"), ("imc_swav", "hungarian"))]
    table = format_table("digits", runs, summarise(runs))
    assert "majority mapping (more clusters than classes), not one-to-one: crlc\n" in table
    runs[0]["mapping"] = "hungarian"
    assert "majority" not in format_table("digits", runs, summarise(runs))


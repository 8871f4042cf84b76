"""Config: defaults, YAML files, key=value overrides, and rejection of bad keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimac.config import (
    DATASET_NAMES,
    METHOD_NAMES,
    Config,
    CRLCConfig,
    config_to_dict,
    load_config,
    resolve_run_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_papers_values() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.method, cfg.data.name, cfg.data.split) == ("crlc", "digits", "all")
    assert (cfg.crlc.heads, cfg.crlc.lambda_fc, cfg.crlc.lambda_ent) == (10, 10.0, 1.0)
    # the paper's CRLC values, no digits tuning hidden in the defaults
    assert cfg.crlc == CRLCConfig() and (cfg.crlc.temperature, cfg.crlc.head_batch_norm) == (0.1, False)
    assert cfg.augment == {}


def test_no_arguments_give_the_tuned_crlc_digits_run() -> None:
    cfg, source = resolve_run_config(None, [])
    assert "crlc_digits.yaml" in source and "tuned" in source
    assert cfg == load_config(Path(CONFIGS[0]).parent / "crlc_digits.yaml")
    # the digits tuning (in the YAML): softer feature temperature, BN in the heads, jitter
    assert (cfg.crlc.temperature, cfg.crlc.head_batch_norm) == (0.5, True)
    assert cfg.augment == {"jitter": (0.4, 0.4, 0.0, 0.0), "jitter_p": 0.5}


@pytest.mark.parametrize("method", ["imc_swav", "dec_contrastive"])
def test_method_on_the_command_line_gets_its_tuned_config(method: str) -> None:
    cfg, source = resolve_run_config(None, [f"method={method}", "seed=2"])
    tuned = load_config(Path(CONFIGS[0]).parent / f"{method}_digits.yaml", ["seed=2"])
    assert cfg == tuned and f"{method}_digits.yaml" in source
    assert cfg != load_config(None, [f"method={method}", "seed=2"])  # not the generic defaults


def test_dataset_on_the_command_line_gets_its_tuned_config() -> None:
    cfg, source = resolve_run_config(None, ["data.name=fashion_mnist", "method=imc_swav"])
    assert "imc_swav_fashion_mnist.yaml" in source
    assert cfg == load_config(Path(CONFIGS[0]).parent / "imc_swav_fashion_mnist.yaml")


def test_no_tuned_config_is_said_loudly(tmp_path: Path) -> None:
    cfg, source = resolve_run_config(None, ["data.name=mnist"])
    assert source.startswith("WARNING") and "crlc_mnist.yaml" in source and "untuned" in source
    assert cfg == load_config(None, ["data.name=mnist"])
    cfg, source = resolve_run_config(None, [], config_dir=tmp_path)  # no configs at all
    assert source.startswith("WARNING") and cfg == Config()
    cfg, source = resolve_run_config(Path(CONFIGS[0]).parent / "crlc_cifar10.yaml", ["seed=1"])
    assert source.endswith("crlc_cifar10.yaml") and cfg.seed == 1  # an explicit file: as given


def test_name_lists_match_the_registries() -> None:
    from mimac.data import DATASETS
    from mimac.models import METHODS

    assert set(METHOD_NAMES) == set(METHODS) and tuple(DATASET_NAMES) == tuple(DATASETS)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("epochs: 7\noptim:\n  name: sgd\n  lr: 1e-2\n  betas: [0.8, 0.99]\n"
                 "data:\n  name: fashion_mnist\naugment:\n  hflip: 0.0\n")
    cfg = load_config(f, ["optim.lr=0.5", "data.split=test", "crlc.hidden_dim=null", "seed=3",
                          "augment.affine_deg=5"])
    assert cfg.epochs == 7 and cfg.optim.name == "sgd" and cfg.optim.lr == 0.5
    assert cfg.optim.betas == (0.8, 0.99) and cfg.data.name == "fashion_mnist"
    assert cfg.data.split == "test" and cfg.seed == 3 and cfg.crlc.hidden_dim is None
    assert cfg.augment == {"hflip": 0.0, "affine_deg": 5.0}
    # round trip through the saved YAML
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("override,needle", [
    ("epoch=3", "'epoch'"),
    ("optim.learning_rate=0.1", "'optim.learning_rate'"),
    ("nosuch.key=1", "'nosuch'"),
    ("augment.flip=0.5", "'augment.flip'"),
])
def test_unknown_keys_rejected(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match="unknown config key") as info:
        load_config(None, [override])
    assert needle in str(info.value)


@pytest.mark.parametrize("override,needle", [
    ("epochs=ten", "'epochs' expects int"),
    ("epochs=2.5", "'epochs' expects int"),
    ("optim.lr=fast", "'optim.lr' expects float"),
    ("seed=true", "'seed' expects int"),
    ("bf16=3", "'bf16' expects bool"),
    ("optim.betas=[0.9]", "'optim.betas' expects tuple"),
    ("data=5", "'data' expects DataConfig"),
    ("augment.hflip=yes please", "'augment.hflip' expects float"),
])
def test_wrong_types_rejected(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match="expects") as info:
        load_config(None, [override])
    assert needle in str(info.value)


@pytest.mark.parametrize("override,key", [
    ("data.split=validation", "data.split"), ("optim.name=lamb", "optim.name"),
    ("epochs=0", "epochs"), ("batch_size=1", "batch_size"), ("crlc.alpha=2", "crlc.alpha"),
    ("device=tpu", "device"), ("optim.gamma=-1", "optim.gamma"),
    ("optim.min_lr_ratio=3", "optim.min_lr_ratio"), ("crlc.lambda_ent=-1", "crlc.lambda_ent"),
    ("crlc.penalty_weight=-0.01", "crlc.penalty_weight"),
    ("imc_swav.entropy_weight=-4", "imc_swav.entropy_weight"), ("crlc.hidden_dim=0", "crlc.hidden_dim"),
    ("dec_contrastive.hidden_dim=0", "dec_contrastive.hidden_dim"),
    ("data.image_size=0", "data.image_size"),
])
def test_bad_values_rejected(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,key", [
    (["method=imc_swav", "imc_swav.large_size=10"], "imc_swav.large_size"),  # digits are 8 px
    (["method=imc_swav", "imc_swav.small_crops=-1"], "imc_swav.large_crops"),
    (["method=imc_swav", "imc_swav.small_scale=[0.5, 0.2]"], "imc_swav.small_scale"),
    (["method=imc_swav", "imc_swav.epsilon=0"], "imc_swav.epsilon"),
    (["method=dec_contrastive", "dec_contrastive.pretrain_epochs=100"], "dec_contrastive.pretrain_epochs"),
    (["method=dec_contrastive", "dec_contrastive.kmeans_iters=0"], "dec_contrastive.kmeans_iters"),
    (["method=knn"], "method"), (["data.name=imagenet"], "data.name"),
    (["model.backbone=vit"], "model.backbone"), (["kernel_backend=gpu"], "kernel_backend"),
    (["data.image_size=32"], "data.image_size"),  # folder only
    (["augment.jitter_p=1.5"], "augment"),
])
def test_method_and_data_values_checked_before_any_data_is_read(
        overrides: list[str], key: str, monkeypatch) -> None:
    from mimac.data import datasets

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the config was checked")

    monkeypatch.setattr(datasets, "load_dataset", no_data)
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, overrides)


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match="'optim.lrr'"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["epochs"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    from mimac.models import METHODS

    cfg = load_config(path)
    assert cfg.method in METHODS and path.name.startswith(cfg.method + "_")


def test_paper_settings_in_cifar_configs() -> None:
    cfg = load_config(Path(CONFIGS[0]).parent / "crlc_cifar10.yaml")
    assert cfg.model.backbone == "resnet34" and cfg.optim.name == "sgd"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.batch_size, cfg.epochs, cfg.crlc.alpha) == (512, 2000, 0.01)


def test_augment_sections_merge_without_hidden_rules(tmp_path: Path) -> None:
    assert load_config(None, ["data.name=fashion_mnist"]).augment == {}
    assert load_config(None, ["data.name=fashion_mnist", "augment.hflip=0.0"]).augment == {"hflip": 0.0}
    digits = Path(CONFIGS[0]).parent / "crlc_digits.yaml"
    assert load_config(digits, ["augment.hflip=0.0"]).augment == {
        "jitter": (0.4, 0.4, 0.0, 0.0), "jitter_p": 0.5, "hflip": 0.0}  # merged
    # a file's augment stays when the data changes: what the file says is what runs
    assert load_config(digits, ["data.name=mnist"]).augment["jitter_p"] == 0.5
    f = tmp_path / "a.yaml"
    f.write_text("augment:\n  affine_deg: 3\n")
    assert load_config(f).augment == {"affine_deg": 3.0}
    assert load_config(Path(CONFIGS[0]).parent / "crlc_fashion_mnist.yaml").augment == {}

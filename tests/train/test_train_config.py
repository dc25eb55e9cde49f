"""The training config: YAML <-> dataclasses, strict keys, types and ranges, and the generated reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import assert_usage_error

from romscale.train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_reference,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict({"steps": 7, "model": {"memory": "meki", "meki": {"d_mem": 4, "layers": [0, 1]}},
                            "optim": {"lr": 2e-3, "warmup_steps": 1}})
    assert cfg.model.meki.layers == (0, 1) and cfg.optim.beta1 == 0.9 and cfg.optim.beta2 == 0.95
    p = tmp_path / "out.yaml"
    save_config(cfg, p)
    assert load_config(p) == cfg
    assert load_config(_write(tmp_path, "")) == TrainConfig()  # an empty file is all defaults
    assert cfg.global_batch(processes=2) == cfg.data.batch_size * 2


@pytest.mark.parametrize("data, needle", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"optim": {"learning_rate": 1}}, "unknown key 'optim.learning_rate'"),
    ({"model": {"meki": {"dmem": 4}}}, "unknown key 'model.meki.dmem'"),
    ({"steps": "ten"}, "steps must be an integer"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"progress": "yes"}, "progress must be true or false"),
    ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
    ({"optim": {"lr": 0}}, "optim.lr must be > 0"),
    ({"optim": {"min_lr_ratio": 1.5}}, "optim.min_lr_ratio must be <= 1"),
    ({"optim": {"beta2": 1.0}}, "optim.beta2 must be < 1"),
    ({"data": {"seq_len": 1}}, "data.seq_len must be >= 2"),
    ({"precision": "fp16"}, "precision must be one of 'auto', 'bf16', 'fp32'"),
    ({"model": {"memory": "hopfield"}}, "model.memory must be one of 'none', 'meki', 'ple'"),
    ({"model": "big"}, "model must be a mapping"),
    ({"model": {"meki": {"layers": [0, "x"]}}}, "model.meki.layers[1] must be an integer"),
    ({"model": {"heads": 4, "kv_heads": 3}}, "model.kv_heads (3) must divide model.heads (4)"),
    ({"model": {"layers": 2, "meki": {"layers": [2]}}}, "model.meki.layers has [2]"),
    ({"steps": 5, "optim": {"warmup_steps": 6}}, "optim.warmup_steps (6) is more than steps (5)"),
    (["a", "list"], "the top level must be a mapping"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, data, needle):
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value) and str(p) in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "steps: [1, 2\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "none.yaml")
    # safe_load: no Python objects from tags
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "steps: !!python/object/apply:os.getcwd []\n"))


def _leaf_paths(cls=TrainConfig, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        out += _leaf_paths(type(default), path) if dataclasses.is_dataclass(default) else [path]
    return out


def test_every_field_has_help_and_is_in_the_docs():
    rows = config_reference()
    assert [r[0] for r in rows] == _leaf_paths()
    assert all(len(r[3]) > 10 for r in rows)
    docs = (REPO / "docs" / "training.md").read_text()
    missing = [r[0] for r in rows if f"`{r[0]}`" not in docs]
    assert not missing, f"docs/training.md lacks {missing}; paste romscale.train.config.reference_markdown()"


def test_example_config_loads():
    cfg = load_config(REPO / "configs" / "scratch-cpu.yaml")
    assert cfg.data.corpus and cfg.steps > cfg.optim.warmup_steps and cfg.precision == "auto"


def test_cli_reports_config_errors(cli, tmp_path):
    r = cli("train", _write(tmp_path, {"optim": {"lrr": 1}}), "--out", tmp_path / "run")
    assert_usage_error(r, "unknown key 'optim.lrr'", "c.yaml")
    assert_usage_error(cli("train", tmp_path / "nope.yaml", "--out", tmp_path / "run"), "nope.yaml")
    assert_usage_error(cli("train", _write(tmp_path, {"steps": 3, "optim": {"warmup_steps": 1}}), "--out", tmp_path / "r"),
                       "data.corpus is not set")
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_config_and_run_folder_checks_import_no_torch(tmp_path):
    """`romscale train` refuses a bad config or run folder before importing torch."""
    import subprocess
    import sys

    p = _write(tmp_path, {"steps": 3, "optim": {"warmup_steps": 1}})
    code = ("import sys\nfrom romscale.train.cli import train_command\nfrom romscale.train.config import load_config\n"
            "from romscale.train.checkpoint import run_status\n"
            f"load_config({str(p)!r}); run_status({str(tmp_path / 'run')!r}, resume=False, overwrite=False)\n"
            "bad = [m for m in ('torch', 'transformers', 'numpy', 'accelerate') if m in sys.modules]\nassert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr

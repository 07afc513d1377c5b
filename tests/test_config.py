"""Run configs: every bad field is refused before any work starts, with the field named, and nothing is written."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from l3rs.config import Config, ConfigError, config_from_dict, load_config
from l3rs.service.driver import Driver


def test_embedded_default_is_valid_and_round_trips():
    cfg = Config().validate()
    assert cfg.data.dataset == "fashion_mnist_debian"
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"nes": {"population_size": 7}}, "nes.population_size"),
        ({"task": {"k_min": 50, "k_max": 10}}, "task.k_min"),
        ({"data": {"dataset": "imagenet_typo"}}, "data.dataset"),
        ({"task": {"num_classes": 6}}, "task.num_classes"),  # fashion-mnist has 5 task classes
        ({"optimizer": {"directions": ["adam", "adagrad_typo"]}}, "optimizer.directions"),
        ({"optimizer": {"init_lr": "3e-3"}}, "optimizer.init_lr"),
        ({"optimizer": {"family": "velo_typo"}}, "optimizer.family"),
        ({"nes": {"sigma": -0.1}}, "nes.sigma"),
        ({"nes": {"sigmaa": 0.1}}, "nes.sigmaa"),
        ({"nes": {"weight_decay_toward": "theta0"}}, "nes.weight_decay_toward"),
        ({"workers": {"min_workers": 3, "max_workers": 2}}, "workers.min_workers"),
        ({"workers": {"resources": {"GPU": 0}}}, "workers.resources"),
        ({"evaluate": {"k_grid": [10, 50]}}, "evaluate.k_grid"),
        ({"model": {"name": "vgg"}}, "model.name"),
        ({"tasks": {}}, "[tasks]"),
        ({"run": {"name": "a/b"}}, "run.name"),
        ({"run": {"keep_checkpoints": -1}}, "run.keep_checkpoints"),
    ],
)
def test_bad_fields_are_named(raw, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(field), str(err.value)


def test_load_config_reads_toml_and_names_bad_fields(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[run]\nname = "x"\n[nes]\npopulation_size = 8\n')
    assert load_config(good).nes.population_size == 8
    bad = tmp_path / "bad.toml"
    bad.write_text("[task]\nk_min = 20\nk_max = 5\n")
    with pytest.raises(ConfigError, match=r"^task\.k_min"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_storage_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cfg = Config().replace(run={"storage": str(locked / "runs")}, model={"checkpoint": "random"})
    with pytest.raises(ConfigError, match=r"^run\.storage"):
        Driver(cfg).run()
    assert list(locked.iterdir()) == []


def test_storage_that_is_a_file_is_refused_and_nothing_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = Config().replace(run={"storage": str(blocker)}, model={"checkpoint": "random"})
    with pytest.raises(ConfigError, match=r"^run\.storage"):
        Driver(cfg).run()
    assert blocker.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["file"]


def test_missing_checkpoint_is_refused_with_the_field_named(tmp_path):
    cfg = Config().replace(run={"storage": str(tmp_path / "runs")}, model={"checkpoint": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"^model\.checkpoint"):
        Driver(cfg).run()
    assert not (tmp_path / "runs" / cfg.run.name).exists()


def test_resume_with_changed_math_is_refused(tmp_path):
    base = Config().replace(run={"storage": str(tmp_path)}, model={"checkpoint": "random"})
    run_dir = tmp_path / base.run.name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(base.to_dict()))
    changed = base.replace(nes={"sigma": 0.05})
    with pytest.raises(ConfigError, match=r"^nes\.sigma: run .* already exists"):
        Driver(changed).run()
    # Extending a run (more generations) or moving its checkpoint cadence is allowed: no error before Ray is needed.
    Driver(base.replace(nes={"generations": 80}))._prepare_run_dir()


def test_cli_refuses_a_bad_field_before_any_work(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "l3rs.cli", "train", "--set", "nes.population_size=7", "--set",
         f"run.storage={str(tmp_path)!r}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "nes.population_size" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_nes_pulls_toward_psi0_by_default_and_published_configs_say_what_they_were_measured_with(tmp_path):
    """The pull toward ψ₀ (docs/anchor) is every run config's default, the glyphs benchmark's included; every other
    shipped config with an ``[nes]`` section states its ``weight_decay``, so the default's change left the numbers
    published for it alone. A run saved under the old default refuses to resume under the new one, naming the
    field."""
    from l3rs.service.preflight import PreflightError, check_resume

    default = Config()
    assert (default.nes.weight_decay, default.nes.weight_decay_toward) == (1.0, "psi0")
    repo = Path(__file__).resolve().parent.parent
    glyphs = load_config(repo / "jobs" / "configs" / "glyphs_default.toml").nes
    assert (glyphs.weight_decay, glyphs.weight_decay_toward) == (default.nes.weight_decay, "psi0")
    shipped = {p.name: tomllib.loads(p.read_text()) for p in sorted((repo / "jobs" / "configs").rglob("*.toml"))}
    unstated = [name for name, raw in shipped.items() if "nes" in raw and "weight_decay" not in raw["nes"]]
    assert unstated == [] and len(shipped) > 30
    assert load_config(repo / "jobs" / "configs" / "fmnist_default.toml").nes.weight_decay == 0.0

    base = Config().replace(run={"storage": str(tmp_path), "name": "old"}, model={"checkpoint": "random"})
    old = base.replace(nes={"weight_decay": 0.0, "weight_decay_toward": "zero"})
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(old.to_dict()))
    with pytest.raises(PreflightError, match=r"^nes\.weight_decay: .*nes\.weight_decay was 0\.0, now 1\.0"):
        check_resume(base, str(run_dir))
    check_resume(old, str(run_dir))

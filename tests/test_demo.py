"""`l3rs demo`'s configuration: the embedded benchmark is glyphs with the paper's three-way class split (issue 11),
the same run as jobs/configs/glyphs_default.toml, with checkpoints and the run kept under the demo's folder."""

from __future__ import annotations

import os

from l3rs.config import Config
from l3rs.demo import DEMO, GLYPHS, demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_the_glyphs_benchmark_under_its_folder(tmp_path):
    cfg = demo_config(Config(), out=str(tmp_path), embedded=True)
    assert cfg.data.dataset == "glyphs"
    assert cfg.evaluate.other_dataset == "fashion_mnist_debian"
    assert cfg.model.checkpoint == os.path.join(str(tmp_path), "pretrain-glyphs")
    assert cfg.evaluate.other_checkpoint == os.path.join(str(tmp_path), "pretrain-fmnist")
    assert cfg.run.storage == str(tmp_path)
    assert cfg.nes.generations == DEMO["nes"]["generations"]
    spec = cfg.data.spec()
    pools = [set(spec.pretrain_classes), set(spec.meta_train_classes), set(spec.meta_test_classes)]
    assert [len(p) for p in pools] == [360, 180, 180]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])


def test_demo_is_the_shipped_glyphs_config(tmp_path):
    """`make demo` and `l3rs train --config jobs/configs/glyphs_default.toml` meta-train the same ψ: every field that
    reaches meta-training is equal (only where the run and checkpoints live differs)."""
    demo = demo_config(Config(), out=str(tmp_path), embedded=True)
    shipped = Config.from_toml(os.path.join(ROOT, "jobs", "configs", "glyphs_default.toml"))
    for section in ("data", "task", "optimizer", "nes", "workers"):
        assert getattr(demo, section) == getattr(shipped, section), section
    assert demo.run.name == shipped.run.name and demo.run.seed == shipped.run.seed
    assert (demo.pretrain.steps, demo.pretrain.learning_rate) == (
        shipped.pretrain.steps,
        shipped.pretrain.learning_rate,
    )
    assert GLYPHS["evaluate"]["other_dataset"] == shipped.evaluate.other_dataset


def test_a_given_config_is_not_replaced(tmp_path):
    cfg = demo_config(Config(), out=str(tmp_path), embedded=False)
    assert cfg.data.dataset == Config().data.dataset
    assert cfg.model.checkpoint == os.path.join(str(tmp_path), "pretrain-fmnist")
    assert cfg.evaluate.other_checkpoint == os.path.join(str(tmp_path), "pretrain-digits")

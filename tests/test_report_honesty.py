"""Honest reports (issue 11 part 4, issue 13): for every setting A–E the report states which classes of which dataset
θ0 was pretrained on, meta-training used and the evaluation tasks use, read from the real checkpoint and artifact
files; it says "shared classes" when the evaluation classes are meta-training's; it shows the standard error and the
number of tasks; the best-Adam rule names only the variants run; and no report file or figure title holds an
absolute path.

The report is built by the production path (plan_settings → load_artifacts → build_optimizers →
classes_for_setting → build_report → write_report) from two real pretrained checkpoints (sklearn_digits, a few steps
each; settings B and D draw their tasks from Fashion-MNIST) and a real ψ artifact. The per-task numbers are the
SettingResult structures evaluate_setting produces, filled with seeded random accuracies (running the fine-tuning
itself is tests/test_evaluate.py's job).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import jax
import numpy as np
import pytest

from l3rs.config import config_from_dict
from l3rs.data import get_spec
from l3rs.meta import evaluate as ev
from l3rs.meta.provenance import (
    SHARED_NOTE,
    class_statement,
    format_classes,
    meta_train_classes,
    relation,
    setting_classes,
)
from l3rs.names import display_uri
from l3rs.report import (
    baselines_figure,
    build_report,
    figure_text,
    layer_stats_figure,
    meta_evaluation_figure,
    write_report,
)

K_GRID = (5, 10, 20)
N_TASKS = 4
HOME, OTHER = "sklearn_digits", "fashion_mnist_debian"
OTHER_CKPT_DATASET = HOME  # what evaluate.other_checkpoint was pretrained on


def _results(cfg, specs, optimizers) -> dict[str, ev.SettingResult]:
    """Per setting, the structure evaluate_setting returns, with seeded accuracies and losses."""
    rng = np.random.default_rng(0)
    out = {}
    for s in specs:
        acc = {o.name: rng.uniform(0.2, 0.95, (N_TASKS, len(K_GRID))) for o in optimizers}
        loss = {name: -np.log(a) for name, a in acc.items()}
        seeds = np.asarray(ev.eval_task_seeds(cfg, s.name, N_TASKS), np.uint64)
        out[s.name] = ev.SettingResult(s.name, K_GRID, np.arange(N_TASKS), seeds, acc, loss)
    return out


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    from l3rs.artifact import save_artifact
    from l3rs.meta.pretrain import pretrain
    from l3rs.optim import L3RSConfig, init_psi

    root = tmp_path_factory.mktemp("honest")
    storage = root / "runs"
    home_ckpt = storage / "pretrain-digits"  # inside the run storage: named "pretrain-digits"
    other_ckpt = root / "elsewhere" / "pretrain-other"  # outside it, given as an absolute path: "…/pretrain-other"
    # The other checkpoint is pretrained on sklearn_digits too (another seed): pretraining on Fashion-MNIST would
    # only cost time, and C/D then cover both "disjoint" (C) and "other dataset" (D) against θ0's classes.
    for seed, out in ((0, home_ckpt), (1, other_ckpt)):
        pretrain(dataset=OTHER_CKPT_DATASET, model_name="small_cnn", steps=2, batch_size=16, learning_rate=1e-3,
                 seed=seed, output=str(out), progress=False)  # fmt: skip
    cfg = config_from_dict(
        {
            "run": {"name": "honest", "storage": str(storage), "seed": 0},
            "data": {"dataset": HOME},
            "model": {"name": "small_cnn", "checkpoint": str(home_ckpt)},
            "task": {"num_classes": 5, "batch_size": 16, "eval_batch_size": 32, "k_min": 5, "k_max": 10},
            "evaluate": {"tasks": N_TASKS, "k_grid": list(K_GRID), "adam_lrs": [1e-2, 1e-3],
                         "head_only_baselines": False, "other_dataset": OTHER, "other_checkpoint": str(other_ckpt)},
        }
    )  # fmt: skip
    opt_cfg = L3RSConfig()
    psi = init_psi(opt_cfg, ev.model_params_shapes(cfg), jax.random.key(1))
    psi_dir = storage / "honest" / "psi"
    # The metadata the driver writes (l3rs.service.driver.Driver._write_outputs).
    save_artifact(str(psi_dir), psi, opt_cfg, {"run_name": "honest", "model": "small_cnn",
                                               "model_checkpoint": str(home_ckpt), "dataset": HOME,
                                               "num_classes": 5, "k_range": [5, 10], "train_scope": "all",
                                               "generations": 2})  # fmt: skip
    history = storage / "honest" / "history.jsonl"
    history.write_text(json.dumps({"generation": 0, "fitness_mean": -1.0, "fitness_best": -0.9,
                                   "accuracy_mean": 0.5, "sigma": 0.03, "meta_lr": 0.02}) + "\n")  # fmt: skip

    specs, skipped = ev.plan_settings(cfg, None)
    assert [s.name for s in specs] == list("ABCDE") and not skipped
    artifacts = ev.load_artifacts([str(psi_dir)])
    optimizers = ev.build_optimizers(cfg, artifacts)
    from l3rs.meta.provenance import classes_for_setting

    named = [(a.label, a.meta, display_uri(a.uri, root=cfg.run.storage)) for a in artifacts]
    report = build_report(
        cfg,
        artifacts=artifacts,
        optimizers=optimizers,
        specs=specs,
        results=_results(cfg, specs, optimizers),
        classes={s.name: classes_for_setting(s, 5, named, root=cfg.run.storage) for s in specs},
        skipped=skipped,
        trace=None,
        history=str(history),
        meta={"workers": 1, "tasks_per_setting": N_TASKS, "steps_per_task": 0, "compiles": {}, "seconds": {}},
    )
    out = root / "report"
    write_report(report, str(out), history=str(history))
    return {"root": root, "out": out, "report": report, "cfg": cfg}


def _expected(setting: str) -> dict:
    """What the statement must say for each setting, from the dataset specs (independently of l3rs.meta.provenance)."""
    theta0_ds = {"A": HOME, "B": HOME, "C": OTHER_CKPT_DATASET, "D": OTHER_CKPT_DATASET, "E": None}[setting]
    eval_ds = {"A": HOME, "B": OTHER, "C": HOME, "D": OTHER, "E": HOME}[setting]
    eval_classes = set(get_spec(eval_ds).meta_test_classes)
    mt_classes = set(get_spec(HOME).meta_train_classes)
    if eval_ds != HOME:
        vs_mt = "other dataset"
    elif eval_classes == mt_classes:
        vs_mt = "shared"
    else:
        vs_mt = "disjoint" if not eval_classes & mt_classes else "overlap"
    if theta0_ds is None:
        vs_theta0 = "random"
    elif theta0_ds != eval_ds:
        vs_theta0 = "other dataset"
    else:
        vs_theta0 = "disjoint" if not eval_classes & set(get_spec(theta0_ds).pretrain_classes) else "overlap"
    return {"theta0_ds": theta0_ds, "eval_ds": eval_ds, "eval_classes": sorted(eval_classes),
            "mt_classes": sorted(mt_classes), "vs_mt": vs_mt, "vs_theta0": vs_theta0}  # fmt: skip


def _md_section(md: str, setting: str) -> str:
    start = md.index(f"## {setting}. ")
    end = md.find("\n## ", start + 1)
    return md[start:end]


@pytest.mark.parametrize("setting", list("ABCDE"))
def test_class_statement_is_correct_for_every_setting(honest, setting):
    report = json.loads((honest["out"] / "report.json").read_text())
    s = report["settings"][setting]
    c, exp = s["classes"], _expected(setting)
    # θ0: from the checkpoint's own meta.json.
    if exp["theta0_ds"] is None:
        assert c["theta0"]["checkpoint"] == "random" and c["theta0"]["classes"] == []
    else:
        ckpt = {"A": "pretrain-digits", "B": "pretrain-digits"}.get(setting, "…/pretrain-other")
        assert c["theta0"]["checkpoint"] == ckpt == s["checkpoint"]
        assert c["theta0"]["dataset"] == exp["theta0_ds"]
        assert c["theta0"]["classes"] == sorted(get_spec(exp["theta0_ds"]).pretrain_classes)
        assert c["theta0"]["source"] == "the checkpoint's meta.json"
    # Meta-training: the artifact's dataset, its meta-train classes.
    (mt,) = c["meta_train"]
    assert (mt["optimizer"], mt["dataset"], mt["classes"]) == ("L3RS", HOME, exp["mt_classes"])
    assert mt["artifact"] == "honest/psi" and mt["theta0"] == "pretrain-digits"
    # Evaluation tasks: the setting dataset's meta-test classes, eval batch from its test split.
    assert (c["eval"]["dataset"], c["eval"]["classes"]) == (exp["eval_ds"], exp["eval_classes"])
    assert c["eval"]["eval_split"] == get_spec(exp["eval_ds"]).test_split and c["eval"]["num_ways"] == 5
    assert c["relation"] == {"theta0": exp["vs_theta0"], "meta_train": {"L3RS": exp["vs_mt"]}}

    # report.md says the same, in the setting's own section.
    section = _md_section((honest["out"] / "report.md").read_text(), setting)
    for line in c["statement"]:
        assert f"- {line}" in section
    assert f"{exp['eval_ds']} classes {format_classes(exp['eval_classes'])} (the meta-test classes)" in section
    assert f"L3RS was meta-trained on {HOME} classes {format_classes(exp['mt_classes'])}" in section
    if exp["theta0_ds"] is None:
        assert "θ0: a random initialisation, not pretrained." in section
    else:
        pre = format_classes(get_spec(exp["theta0_ds"]).pretrain_classes)
        assert f"was pretrained on {exp['theta0_ds']} classes {pre}" in section
    assert (SHARED_NOTE in section) == (exp["vs_mt"] == "shared")
    assert (SHARED_NOTE in section.splitlines()[0]) == (exp["vs_mt"] == "shared")  # in the section's title too
    assert f"{N_TASKS} tasks per cell" in section and f"mean ± standard error over the {N_TASKS} tasks" in section

    # report.csv: every row of the setting carries its classes; only the meta-trained row has meta-train columns.
    rows = [r for r in csv.DictReader(io.StringIO((honest["out"] / "report.csv").read_text()))
            if r["setting"] == setting]  # fmt: skip
    assert rows
    for r in rows:
        assert r["eval_dataset"] == exp["eval_ds"]
        assert r["eval_classes"] == format_classes(exp["eval_classes"], dash="-")
        assert r["eval_vs_theta0"] == exp["vs_theta0"]
        assert r["n_tasks"] == str(N_TASKS)
        if r["optimizer"] == "L3RS":
            assert (r["meta_train_dataset"], r["eval_vs_meta_train"]) == (HOME, exp["vs_mt"])
            assert r["meta_train_classes"] == format_classes(exp["mt_classes"], dash="-")
        else:
            assert r["meta_train_dataset"] == r["meta_train_classes"] == r["eval_vs_meta_train"] == ""


def test_standard_error_is_shown_next_to_each_mean(honest):
    report = json.loads((honest["out"] / "report.json").read_text())
    s = report["settings"]["A"]
    per_task = np.asarray(s["per_task"]["accuracy"]["L3RS"])  # [tasks, K]
    rows = {(r["optimizer"], r["K"]): r for r in s["rows"]}
    for j, k in enumerate(K_GRID):
        x = per_task[:, j]
        se = math.sqrt(sum((v - x.mean()) ** 2 for v in x) / (len(x) - 1)) / math.sqrt(len(x))
        row = rows[("L3RS", k)]
        assert row["se_acc"] == pytest.approx(se) and row["std_acc"] == pytest.approx(x.std())
        assert row["n_tasks"] == N_TASKS
    section = _md_section((honest["out"] / "report.md").read_text(), "A")
    r = rows[("L3RS", K_GRID[0])]
    assert f"{100 * r['mean_acc']:.2f} ± {100 * r['se_acc']:.2f}" in section
    csv_rows = list(csv.DictReader(io.StringIO((honest["out"] / "report.csv").read_text())))
    first = next(c for c in csv_rows if c["setting"] == "A" and c["optimizer"] == "L3RS" and c["K"] == str(K_GRID[0]))
    assert float(first["se_acc"]) == r["se_acc"] and float(first["std_acc"]) == r["std_acc"]


def test_best_adam_rule_names_only_the_variants_run(honest):
    rule = honest["report"]["meta"]["best_adam"]
    assert "cosine and constant Adam, on the whole network, at lr ∈ {1e-2, 1e-3}" in rule
    assert "(4 variants run)" in rule and "head" not in rule and "3e-4" not in rule
    assert rule in (honest["out"] / "report.md").read_text()
    # With head-only baselines and another grid, the rule follows.
    opts = [{"kind": "adam", "schedule": sch, "train_scope": sc, "learning_rate": lr}
            for sc in ("all", "head") for sch in ("constant",) for lr in (3e-3,)]  # fmt: skip
    from l3rs.report import best_adam_rule

    assert "constant Adam, on the whole network and on the head only, at lr ∈ {3e-3} (2 variants run)" in (
        best_adam_rule(opts)
    )


def test_the_psi0_row_says_whose_options_it_was_made_with(honest, tmp_path):
    """report.md says what ψ₀ is and whose options it has; with two artifacts of other options (here, other bounds on
    λ), build_optimizers indeed makes ψ₀ with the first one's, and the statement names that one."""
    from l3rs.artifact import save_artifact
    from l3rs.optim import L3RSConfig
    from l3rs.report import psi0_statement

    statement = honest["report"]["meta"]["psi0"]
    assert statement == "L3RS ψ₀ = the untrained start of meta-training (run.seed 0), with the options of the first " \
        "artifact, L3RS."  # fmt: skip
    assert statement in (honest["out"] / "report.md").read_text()

    cfg = honest["cfg"]
    first, second = L3RSConfig(lambda_max_adam_ratio=3.0), L3RSConfig()
    uris = []
    for name, opt_cfg in (("bound3", first), ("bound10", second)):
        uri = str(tmp_path / name / "psi")
        psi = opt_cfg.init(ev.model_params_shapes(cfg), jax.random.key(2))
        save_artifact(uri, psi, opt_cfg, {"run_name": name, "model": "small_cnn", "k_range": [5, 10]})
        uris.append(uri)
    optimizers = ev.build_optimizers(cfg, ev.load_artifacts(uris))
    psi0 = next(o for o in optimizers if o.group == "psi0")
    assert psi0.config.lambda_max_adam_ratio == 3.0 and psi0.name == "L3RS ψ₀"
    rows = [{"name": o.name, "group": o.group} for o in optimizers]
    labels = [o.name for o in optimizers if o.kind == "learned" and o.group != "psi0"]
    assert labels == ["L3RS (bound3)", "L3RS (bound10)"]
    two = psi0_statement(rows, labels, 0)
    assert "the first artifact, L3RS (bound3) (the other artifacts' own starts were not run)" in two
    assert "[optimizer]" in psi0_statement(rows, [], 4) and "run.seed 4" in psi0_statement(rows, [], 4)
    assert psi0_statement([r for r in rows if r["group"] != "psi0"], labels, 0) is None


def _strings(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


def test_no_absolute_path_in_report_files_or_figure_titles(honest):
    root = str(honest["root"])
    for name in ("report.md", "report.json", "report.csv"):
        text = (honest["out"] / name).read_text()
        assert root not in text, name
        assert os.path.expanduser("~") + "/" not in text or os.path.expanduser("~") == "/", name
    report = json.loads((honest["out"] / "report.json").read_text())
    absolute = [s for s in _strings(report) if s.startswith("/") or s.startswith("~")]
    assert absolute == []
    cfg = report["meta"]["config"]
    assert cfg["model"]["checkpoint"] == "pretrain-digits"
    assert cfg["evaluate"]["other_checkpoint"] == "…/pretrain-other"
    assert report["meta"]["artifacts"][0]["uri"] == "honest/psi"
    assert report["meta_training"]["history"] == "honest/history.jsonl"

    fig = meta_evaluation_figure(report)
    texts = figure_text(fig)
    assert any("θ0: pretrain-digits" in t for t in texts) and any("θ0: …/pretrain-other" in t for t in texts)
    trace = {"optimizer": "L3RS", "setting": "A", "task_seed": 1, "num_steps": 2, "layer_paths": ["a", "b"],
             "directions": ["adam", "sgd"], "mixing": np.full((2, 2, 2), 0.5), "step_norm": np.ones((2, 2)),
             "eval_accuracy": 0.5}  # fmt: skip
    for f in (fig, baselines_figure(report), layer_stats_figure(trace)):
        assert not [t for t in figure_text(f) if root in t or "/tmp" in t]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_paths_are_named_relative_to_the_run():
    assert display_uri("/data/runs/demo/pretrain-fmnist", root="/data/runs/demo") == "pretrain-fmnist"
    assert display_uri("runs/pretrain-fmnist", root="runs", cwd="/w") == "pretrain-fmnist"
    assert display_uri("/w/runs/pretrain-digits", root="/w/runs/demo", given="runs/pretrain-digits") == (
        "runs/pretrain-digits"
    )
    assert display_uri("/w/ckpt/x", root="/elsewhere", cwd="/w") == "ckpt/x"
    assert display_uri("/home/alice/ckpt", root="/data", given="/home/alice/ckpt", cwd="/w") == "…/ckpt"
    assert display_uri("file:///data/runs/r/psi", root="/data/runs") == "r/psi"
    assert display_uri("gs://b/runs/r/psi", root="gs://b/runs") == "r/psi"
    assert display_uri("gs://b/ckpt", root="/data") == "gs://b/ckpt"
    assert display_uri("random", root="/data") == "random"


def test_format_classes_and_relations():
    assert format_classes([4, 0, 1, 2, 3]) == "0–4"
    assert format_classes([1, 3, 4, 5, 9]) == "1, 3–5, 9"
    assert format_classes([5, 6, 7], dash="-") == "5-7"
    assert format_classes(list(range(0, 40, 2)), limit=3) == "0, 2, 4, … (20 classes)"
    assert format_classes([]) == "none"
    assert relation([5, 6], "d", [5, 6], "d") == "shared"
    assert relation([5, 6], "d", [0, 1], "d") == "disjoint"
    assert relation([5, 6], "d", [6, 7], "d") == "overlap"
    assert relation([5, 6], "d", [5, 6, 7], "d") == "subset"
    assert relation([5, 6], "d", [5, 6], "e") == "other dataset"
    assert relation([5, 6], "d", None, None) == "unknown"


def test_statement_on_a_disjoint_three_way_split():
    """CIFAR-100's spec splits pretrain / meta-train / meta-test classes disjointly: the statement says the
    evaluation classes are new, and never "shared"."""
    spec = get_spec("cifar100")
    theta0 = {"checkpoint": "pretrain-cifar", "dataset": "cifar100", "classes": list(spec.pretrain_classes),
              "split": spec.train_split, "source": "the checkpoint's meta.json"}  # fmt: skip
    mt = meta_train_classes("L3RS", {"dataset": "cifar100", "num_classes": 25}, name="run/psi")
    c = setting_classes("cifar100", 25, theta0, [mt])
    assert c["relation"] == {"theta0": "disjoint", "meta_train": {"L3RS": "disjoint"}}
    text = " ".join(c["statement"])
    assert SHARED_NOTE not in text and "disjoint from meta-training's classes: new classes" in text
    assert f"cifar100 classes {format_classes(spec.meta_test_classes)} (the meta-test classes)" in text
    assert f"meta-trained on cifar100 classes {format_classes(spec.meta_train_classes)}, 25-way" in text
    # An artifact that records its own meta-training classes is believed over the spec; partly shared is said.
    own = meta_train_classes("L3RS", {"dataset": "cifar100", "meta_train_classes": [75, 76, 3]})
    c = setting_classes("cifar100", 25, theta0, [own])
    assert c["relation"]["meta_train"]["L3RS"] == "overlap" and own["source"] == "the artifact's metadata"
    assert "partly shared with meta-training (classes 75–76 in both)" in " ".join(class_statement(c))
    # The published VeLO weights record no meta-training data here: said, not guessed.
    velo = meta_train_classes("VeLO (og)", {"source": "learned_optimization hyper_v2 checkpoint"})
    c = setting_classes("cifar100", 25, theta0, [velo])
    assert c["relation"]["meta_train"]["VeLO (og)"] == "unknown"
    assert "VeLO (og) was meta-trained elsewhere (learned_optimization hyper_v2 checkpoint)." in c["statement"]


def test_statement_on_a_task_mixture_names_every_source():
    """A ψ meta-trained on a task mixture (its artifact's ``task_sources``): the statement names each source's
    dataset, classes, N-way, weight and θ0, and the relation to the evaluation classes uses the sources on the
    evaluation's dataset (shared with one source, other dataset for the other)."""
    glyphs, fmnist = get_spec("glyphs"), get_spec("fashion_mnist_debian")
    meta = {
        "dataset": "glyphs",
        "num_classes": 5,
        "meta_train_classes": list(glyphs.meta_train_classes),
        "task_sources": [
            {
                "name": "glyphs",
                "weight": 3.0,
                "dataset": "glyphs",
                "num_classes": 5,
                "meta_train_classes": list(glyphs.meta_train_classes),
                "model_checkpoint": "pretrain-glyphs",
            },
            {
                "name": "fmnist",
                "weight": 1.0,
                "dataset": "fashion_mnist_debian",
                "num_classes": 5,
                "meta_train_classes": list(fmnist.meta_train_classes),
                "model_checkpoint": "pretrain-fmnist",
            },
        ],
    }
    mt = meta_train_classes("L3RS", meta, name="mix/psi")  # fmt: skip
    assert [s["name"] for s in mt["sources"]] == ["glyphs", "fmnist"] and mt["sources"][1]["weight"] == 1.0
    theta0 = {"checkpoint": "pretrain-fmnist", "dataset": "fashion_mnist_debian",
                            "classes": list(fmnist.pretrain_classes), "split": "train", "source": "x"}  # fmt: skip
    c = setting_classes("fashion_mnist_debian", 5, theta0, [mt])
    assert c["relation"]["meta_train"]["L3RS"] == "shared"  # Fashion-MNIST's tasks: its source's classes 5-9
    text = " ".join(c["statement"])
    assert "L3RS was meta-trained on a task mixture of 2 sources: glyphs (weight 3): glyphs classes" in text
    assert "fmnist (weight 1): fashion_mnist_debian classes 5–9, 5-way, θ0 pretrain-fmnist." in text
    assert f"{SHARED_NOTE} — they are exactly meta-training's classes" in text
    c = setting_classes("glyphs", 5, {**theta0, "dataset": "glyphs", "classes": list(glyphs.pretrain_classes)}, [mt])
    assert c["relation"]["meta_train"]["L3RS"] == "disjoint"  # glyphs' meta-test classes: new to both sources
    c = setting_classes("sklearn_digits", 5, theta0, [mt])
    assert c["relation"]["meta_train"]["L3RS"] == "other dataset"

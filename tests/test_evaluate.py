"""Meta-evaluation (paper §5, Fig. 3 A–F, Tables 5–10): the statistics against hand-computed values, the held-out
seed stream, and a real end-to-end evaluation on sklearn_digits (a 50-step pretrained small CNN, a saved ψ artifact,
3 tasks, K ∈ {5, 10, 20} past a meta-training range of K ≤ 10) through ``l3rs evaluate``'s entry point with two
processes, checked against the same tasks run in this process with other shardings.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os

import jax
import numpy as np
import pytest

from l3rs.config import ConfigError, config_from_dict
from l3rs.meta import evaluate as ev
from l3rs.meta.inner import cosine_schedule
from l3rs.meta.tasks import task_seed

K_GRID = (5, 10, 20)
LRS = (1e-2, 1e-3)


# ----------------------------------------------------------------------------------------------------------------
# statistics (pure)
# ----------------------------------------------------------------------------------------------------------------
def test_mean_std_over_tasks_is_population_std():
    mean, std = ev.mean_std([[0.5, 1.0, 0.25], [0.7, 0.0, 0.25], [0.6, 0.5, 0.25]])
    np.testing.assert_allclose(mean, [0.6, 0.5, 0.25])
    np.testing.assert_allclose(std, [math.sqrt(0.02 / 3), math.sqrt(0.5 / 3), 0.0])
    # A diverged run (NaN loss) is not hidden.
    mean, std = ev.mean_std([[1.0], [np.nan]])
    assert np.isnan(mean[0]) and np.isnan(std[0])
    with pytest.raises(ValueError, match="at least one task"):
        ev.mean_std(np.zeros((0, 3)))


def test_standard_error_is_the_sample_std_over_root_n():
    se = ev.standard_error([[0.5, 1.0], [0.7, 0.0], [0.6, 0.5]])
    # column 0: deviations -0.1, 0.1, 0 → sample variance 0.02 / 2; column 1: 0.5 / 2.
    np.testing.assert_allclose(se, [math.sqrt(0.01 / 3), math.sqrt(0.25 / 3)])
    assert np.isnan(ev.standard_error([[0.5, 0.7]])).all()  # one task: no spread to estimate
    assert np.isnan(ev.standard_error([[1.0], [np.nan]])[0])
    with pytest.raises(ValueError, match="at least one task"):
        ev.standard_error(np.zeros((0, 2)))


def test_best_per_k_takes_the_highest_mean_first_on_ties_and_never_nan():
    means = {"a": [0.1, 0.5, np.nan, 0.3], "b": [0.2, 0.5, 0.3, 0.1], "c": [0.15, 0.4, 0.2, 0.2]}
    assert ev.best_per_k(means, ["a", "b", "c"]) == ["b", "a", "b", "a"]
    assert ev.best_per_k(means, ["c", "b", "a"]) == ["b", "b", "b", "a"]
    with pytest.raises(ValueError, match="NaN"):
        ev.best_per_k({"a": [np.nan], "b": [np.nan]})


def test_interp_steps_is_linear_in_log_k():
    ks, acc = [10, 100, 1000], [0.5, 0.7, 0.9]
    assert ev.interp_steps(ks, acc, 0.6) == pytest.approx(math.sqrt(10 * 100))  # halfway in log K
    assert ev.interp_steps(ks, acc, 0.85) == pytest.approx(10 ** (2 + 0.75))
    assert ev.interp_steps(ks, acc, 0.9) == pytest.approx(1000)
    assert ev.interp_steps(ks, acc, 0.5) == 10  # reached at the first K
    assert ev.interp_steps(ks, acc, 0.3) == 10  # already above: the first K (a bound)
    assert math.isnan(ev.interp_steps(ks, acc, 0.95))  # never within the grid
    # Not monotone: the first crossing counts (between 10 and 100: t = (0.7 - 0.5) / 0.3).
    assert ev.interp_steps(ks, [0.5, 0.8, 0.6], 0.7) == pytest.approx(10 ** (1 + 2 / 3))
    assert ev.interp_steps(ks, [np.nan, 0.8, 0.9], 0.7) == 100  # no finite point before the crossing


def test_speedup_table_hand_computed():
    rows = ev.speedup_table([10, 100, 1000], [0.5, 0.7, 0.9], [0.6, 0.8, 0.95])
    assert [r["k_baseline"] for r in rows] == [10, 100, 1000]
    assert rows[0]["k_l3rs"] == 10 and rows[0]["speedup"] == 1.0 and rows[0]["bound"] == ">="
    # level 0.7: L3RS between K=10 (0.6) and K=100 (0.8), halfway in log K → √1000.
    assert rows[1]["k_l3rs"] == pytest.approx(math.sqrt(1000)) and rows[1]["bound"] == ""
    assert rows[1]["speedup"] == pytest.approx(100 / math.sqrt(1000))
    # level 0.9: between K=100 (0.8) and K=1000 (0.95), t = 2/3 → 10^(8/3).
    assert rows[2]["k_l3rs"] == pytest.approx(10 ** (8 / 3))
    assert rows[2]["speedup"] == pytest.approx(1000 / 10 ** (8 / 3))
    slow = ev.speedup_table([10, 100], [0.5, 0.9], [0.4, 0.8])
    assert slow[0]["bound"] == "" and slow[0]["speedup"] == pytest.approx(10 / 10**1.25)  # t = 0.1 / 0.4
    assert slow[1]["bound"] == "never" and math.isnan(slow[1]["speedup"])


def test_win_counts_per_k():
    l3rs = np.array([[0.9, 0.5], [0.7, 0.6], [0.8, 0.6]])
    adam = np.array([[0.8, 0.5], [0.7, 0.7], [0.9, 0.5]])
    assert ev.win_counts(l3rs, adam) == [
        {"wins": 1, "ties": 1, "losses": 1},
        {"wins": 1, "ties": 1, "losses": 1},
    ]


def test_cosine_schedule_values():
    schedule = cosine_schedule(np.float32(0.1), np.int32(10))
    expected = {0: 0.1, 2: 0.05 * (1 + math.cos(0.2 * math.pi)), 5: 0.05, 10: 0.0, 15: 0.0}
    for k, value in expected.items():
        assert float(schedule(np.int32(k))) == pytest.approx(value, abs=1e-7)


def test_summarize_setting_best_adam_and_rows():
    opts = [
        ev.OptimizerSpec("L3RS", "learned", "l3rs"),
        ev.OptimizerSpec("Adam (const), 1e-2", "adam", "adam_const", schedule="constant", learning_rate=1e-2),
        ev.OptimizerSpec("Adam (cosine), 1e-2", "adam", "adam_cosine", schedule="cosine", learning_rate=1e-2),
    ]
    acc = {
        "L3RS": np.array([[0.8, 0.9], [0.6, 0.7]]),
        "Adam (const), 1e-2": np.array([[0.7, 0.8], [0.5, 0.6]]),  # best at K=10 (mean 0.6)
        "Adam (cosine), 1e-2": np.array([[0.4, 0.95], [0.6, 0.65]]),  # best at K=200 (mean 0.8)
    }
    loss = {k: 1 - v for k, v in acc.items()}
    loss["Adam (const), 1e-2"][1, 1] = np.inf  # diverged on one task
    result = ev.SettingResult("A", (10, 200), np.array([0, 1]), np.array([5, 6], np.uint64), acc, loss)
    s = ev.summarize_setting(result, opts)
    assert s["best_adam"]["variant"] == ["Adam (const), 1e-2", "Adam (cosine), 1e-2"]
    rows = {(r["optimizer"], r["K"]): r for r in s["rows"]}
    assert rows[("best Adam", 10)]["mean_acc"] == pytest.approx(0.6)
    assert rows[("best Adam", 10)]["std_acc"] == pytest.approx(0.1)
    assert rows[("best Adam", 200)]["mean_acc"] == pytest.approx(0.8)
    assert rows[("best Adam", 200)]["std_acc"] == pytest.approx(0.15)
    assert rows[("best Adam", 200)]["se_acc"] == pytest.approx(0.15)  # n = 2: std·√2/√2
    assert rows[("L3RS", 10)]["se_acc"] == pytest.approx(0.1)
    assert rows[("L3RS", 200)]["mean_acc"] == pytest.approx(0.8) and rows[("L3RS", 200)]["n_tasks"] == 2
    assert rows[("Adam (const), 1e-2", 200)]["mean_loss"] is None  # non-finite → None (JSON null, empty CSV cell)
    # Per task vs best Adam: K=10: 0.8 > 0.7, 0.6 > 0.5; K=200: 0.9 < 0.95, 0.7 > 0.65.
    assert s["wins_vs_best_adam"]["L3RS"] == [
        {"wins": 2, "ties": 0, "losses": 0},
        {"wins": 1, "ties": 0, "losses": 1},
    ]


def test_eval_task_seeds_never_meet_meta_training_seeds():
    cfg = config_from_dict({"data": {"dataset": "sklearn_digits"}})
    seeds = {s: ev.eval_task_seeds(cfg, s, 50) for s in "ABCDE"}
    assert seeds["A"] == ev.eval_task_seeds(cfg, "A", 50)  # pure
    flat = [x for v in seeds.values() for x in v]
    assert len(set(flat)) == len(flat)  # distinct across settings and tasks
    assert min(flat) >= 2**32  # meta-training seeds are 32-bit
    train = {task_seed(cfg.run.seed, g, i) for g in range(200) for i in range(4)}
    assert max(train) < 2**32 and not train & set(flat)
    other = config_from_dict({"data": {"dataset": "sklearn_digits"}, "evaluate": {"seed": 7}})
    assert ev.eval_task_seeds(other, "A", 5) != seeds["A"][:5]


def test_eval_distribution_is_the_held_out_test_split():
    from l3rs.data import get_spec, load
    from l3rs.meta.tasks import load_task_pool

    cfg = config_from_dict({"data": {"dataset": "sklearn_digits"}, "evaluate": {"k_grid": [10, 300]}})
    dist = ev.eval_distribution(cfg, "sklearn_digits")
    assert dist.stage == "meta_test" and dist.k_min == dist.k_max == 300
    spec = get_spec("sklearn_digits")
    pool = load_task_pool(dist)
    test = load("sklearn_digits", spec.test_split, classes=list(spec.meta_test_classes))
    np.testing.assert_array_equal(pool.eval_images, test.images)


def test_format_lr():
    assert [ev.format_lr(x) for x in (1e-3, 3e-05, 0.0025, 0.03)] == ["1e-3", "3e-5", "2.5e-3", "3e-2"]


# ----------------------------------------------------------------------------------------------------------------
# end to end on real data
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 50-step pretrained θ0 on sklearn_digits, a ψ artifact with a history next to it, and the config."""
    from l3rs.artifact import save_artifact
    from l3rs.meta.pretrain import pretrain
    from l3rs.optim import L3RSConfig, init_psi

    root = tmp_path_factory.mktemp("evaluate")
    ckpt = str(root / "pretrain-digits")
    pretrain(dataset="sklearn_digits", model_name="small_cnn", steps=50, batch_size=64, learning_rate=3e-3,
             seed=0, output=ckpt, progress=False)  # fmt: skip
    cfg = config_from_dict(
        {
            "run": {"name": "unit", "storage": str(root / "runs"), "seed": 0},
            "data": {"dataset": "sklearn_digits"},
            "model": {"name": "small_cnn", "checkpoint": ckpt},
            "task": {"num_classes": 5, "batch_size": 32, "eval_batch_size": 64, "k_min": 5, "k_max": 10},
            "evaluate": {"tasks": 3, "k_grid": list(K_GRID), "adam_lrs": list(LRS), "settings": ["A", "C", "E"],
                         "other_dataset": "sklearn_digits", "other_checkpoint": str(root / "no-such-checkpoint")},
        }
    )  # fmt: skip
    # A "trained" ψ: another L3RS config and seed than ψ₀, saved as a real artifact.
    opt_cfg = L3RSConfig(init_lr=1e-2)
    psi = init_psi(opt_cfg, ev.model_params_shapes(cfg), jax.random.key(7))
    run_dir = root / "runs" / "unit"
    meta = {"run_name": "unit", "model": "small_cnn", "dataset": "sklearn_digits", "k_range": [5, 10],
            "train_scope": "all", "generations": 3}  # fmt: skip
    art_meta = save_artifact(str(run_dir / "psi"), psi, opt_cfg, meta)
    history = [
        {"generation": g, "fitness_mean": -1.0 + 0.1 * g, "fitness_best": -0.9 + 0.1 * g, "accuracy_mean": 0.5,
         "sigma": 0.03, "meta_lr": 0.02}
        for g in range(3)
    ]  # fmt: skip
    (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return {"cfg": cfg, "root": root, "psi": str(run_dir / "psi"), "sha256": art_meta["sha256"]}


@pytest.fixture(scope="module")
def pool_report(env):
    """``l3rs evaluate`` (its entry point) with two spawn worker processes; (return code, folder, printed text)."""
    out = env["root"] / "report"
    args = argparse.Namespace(psi=[env["psi"]], tasks=3, out=str(out), settings="ACE", workers=2)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = ev.run_evaluation_cli(args, env["cfg"])
    return rc, out, printed.getvalue()


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_cli_writes_consistent_report(env, pool_report):
    rc, out, printed = pool_report
    assert rc == 0
    assert "A. In-domain" in printed and "F. Speedup" in printed and "report.md" in printed
    for name in ("report.md", "report.csv", "report.json", "fig3_meta_evaluation.png", "fig3_baselines.png",
                 "fig4_layer_stats.png", "meta_training.png"):  # fmt: skip
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "l3rs-evaluation/1"
    assert set(report["settings"]) == {"A", "E"}
    assert "C" in report["skipped"] and "evaluate.other_checkpoint" in report["skipped"]["C"]
    assert report["meta"]["artifacts"][0]["sha256"] == env["sha256"]
    assert report["meta"]["config"]["evaluate"]["k_grid"] == list(K_GRID)
    assert report["meta_training"]["generations"] == 3
    assert sorted(report["files"].values()) == sorted(p.name for p in out.iterdir())

    names = [o["name"] for o in report["optimizers"]]
    expected = ["L3RS", "L3RS ψ₀"] + [
        f"Adam ({tag}), {lr}" for tag in ("cosine", "const", "cosine, head", "const, head") for lr in ("1e-2", "1e-3")
    ]
    assert names == expected  # fmt: skip

    # json numbers == csv numbers, row for row; accuracies are fractions.
    json_rows = [r for s in report["settings"].values() for r in s["rows"]]
    csv_rows = _csv_rows(out / "report.csv")
    assert len(csv_rows) == len(json_rows) == 2 * (len(names) + 1) * len(K_GRID)
    for c, j in zip(csv_rows, json_rows, strict=True):
        assert (c["setting"], c["optimizer"], int(c["K"]), int(c["n_tasks"])) == (
            j["setting"], j["optimizer"], j["K"], j["n_tasks"])  # fmt: skip
        for key in ("mean_acc", "std_acc", "mean_loss", "std_loss"):
            assert (None if c[key] == "" else float(c[key])) == j[key]
        assert 0.0 <= j["mean_acc"] <= 1.0 and j["n_tasks"] == 3

    for name, s in report["settings"].items():
        per_task = s["per_task"]
        assert len(per_task["task_seed"]) == 3 and per_task["task_index"] == [0, 1, 2]
        assert per_task["task_seed"] == ev.eval_task_seeds(env["cfg"], name, 3)
        for rows in per_task["accuracy"].values():
            assert np.all((np.asarray(rows) >= 0) & (np.asarray(rows) <= 1))
        # Best Adam per K is the best Adam row by mean accuracy, and its row repeats that variant's numbers.
        rows = {(r["optimizer"], r["K"]): r for r in s["rows"]}
        for k, variant in zip(K_GRID, s["best_adam"]["variant"], strict=True):
            adam_means = [rows[(n, k)]["mean_acc"] for n in names if n.startswith("Adam")]
            assert rows[(variant, k)]["mean_acc"] == max(adam_means)
            assert rows[("best Adam", k)]["mean_acc"] == pytest.approx(rows[(variant, k)]["mean_acc"])
            assert rows[("best Adam", k)]["std_acc"] == pytest.approx(rows[(variant, k)]["std_acc"])
        assert sum(s["wins_vs_best_adam"]["L3RS"][0].values()) == 3

    speed = report["speedup"]
    assert speed["setting"] == "A" and speed["baseline"] == "best Adam"
    assert [r["k_baseline"] for r in speed["by_setting"]["A"]["L3RS"]] == list(K_GRID)
    ls = report["layer_stats"]
    assert ls["optimizer"] == "L3RS" and np.asarray(ls["mixing"]).shape == (100, 11, 2)
    np.testing.assert_allclose(np.asarray(ls["mixing"]).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(ls["step_norm"]) >= 0)

    md = (out / "report.md").read_text()
    for text in ("## A. In-domain", "## E. Random initialisation", "best Adam", "## F. Speedup", "K=20†",
                 "fig3_meta_evaluation.png", "fig4_layer_stats.png", "Head-only", "skipped"):  # fmt: skip
        assert text in md, text

    # Honest about classes: sklearn_digits' meta-test classes are its meta-training classes (5–9), and θ0 was
    # pretrained on 0–4; the checkpoint's and the artifact's files say so.
    for name in ("A", "E"):
        c = report["settings"][name]["classes"]
        assert c["eval"]["classes"] == c["meta_train"][0]["classes"] == [5, 6, 7, 8, 9]
        assert c["relation"]["meta_train"] == {"L3RS": "shared"}
    assert report["settings"]["A"]["classes"]["theta0"]["classes"] == [0, 1, 2, 3, 4]
    assert report["settings"]["E"]["classes"]["relation"]["theta0"] == "random"
    assert "## A. In-domain (shared classes: these tasks are not new classes)" in md
    assert "sklearn_digits classes 5–9 (the meta-test classes)" in md and "3 tasks per cell" in md
    assert "cosine and constant Adam, on the whole network and on the head only, at lr ∈ {1e-2, 1e-3}" in md
    # No absolute machine path: checkpoints and the artifact are named relative to the run.
    for name in ("report.md", "report.json", "report.csv"):
        assert str(env["root"]) not in (out / name).read_text(), name
    assert report["meta"]["artifacts"][0]["uri"] == "unit/psi"
    assert "evaluate.other_checkpoint" in report["skipped"]["C"] and "…/no-such-checkpoint" in report["skipped"]["C"]


def test_shards_give_the_same_numbers_in_any_process(env, pool_report):
    """1 shard vs 2 shards in this process: identical; and equal to the two-process run's numbers."""
    cfg = env["cfg"]
    _, out, _ = pool_report
    report = json.loads((out / "report.json").read_text())
    artifacts = ev.load_artifacts([env["psi"]])
    opts = [o for o in ev.build_optimizers(cfg, artifacts) if o.name in ("L3RS", "Adam (cosine), 1e-2",
                                                                         "Adam (const), 1e-3")]  # fmt: skip
    seeds = ev.eval_task_seeds(cfg, "A", 3)
    whole = ev.evaluate_setting(cfg, "A", opts, seeds)
    assert whole.compiles == 3  # one per optimizer kind, whatever the K
    parts = [ev.evaluate_setting(cfg, "A", opts, seeds, shard=(1, 2)), ev.evaluate_setting(cfg, "A", opts, seeds,
                                                                                            shard=(0, 2))]  # fmt: skip
    assert parts[0].indices.tolist() == [1] and parts[1].indices.tolist() == [0, 2]
    assert sum(p.compiles for p in parts) == 0  # the process kept its loops
    merged = ev.merge_results(parts)
    assert merged.indices.tolist() == [0, 1, 2]
    for o in opts:
        np.testing.assert_array_equal(merged.accuracy[o.name], whole.accuracy[o.name])
        np.testing.assert_array_equal(merged.loss[o.name], whole.loss[o.name])
        # The pool ran one task per job in two single-threaded processes: same tasks, same numbers.
        pooled = report["settings"]["A"]["per_task"]
        np.testing.assert_allclose(whole.loss[o.name], np.asarray(pooled["loss"][o.name], float), rtol=1e-4)
        np.testing.assert_allclose(whole.accuracy[o.name], pooled["accuracy"][o.name], atol=1.01 / 64)
    assert np.all(np.isfinite(whole.loss["L3RS"]))
    with pytest.raises(ValueError, match="shard"):
        ev.evaluate_setting(cfg, "A", opts, seeds, shard=(2, 2))
    with pytest.raises(ValueError, match="two parts"):
        ev.merge_results([parts[0], parts[0]])
    ev.clear_runners()


def test_a_stopped_evaluation_resumes_and_a_new_row_runs_alone(env, pool_report, tmp_path):
    """Every finished task is kept under <out>/tasks, row by row: run again, a lost task and more --tasks run only
    what is missing; another ψ beside the same baselines runs only its own rows; numbers read back are the first run's
    exactly; a changed config or θ0 never reuses a stored task, a moved θ0 does."""
    import shutil

    from l3rs.artifact import save_artifact
    from l3rs.meta.eval_journal import TaskJournal, row_key, setting_key
    from l3rs.optim import L3RSConfig, init_psi

    cfg = env["cfg"]
    _, out, _ = pool_report
    pooled = json.loads((out / "report.json").read_text())
    assert pooled["files"]["tasks"] == "tasks" and pooled["meta"]["resumed"] == {"tasks": 0, "rows": 0}
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stored = sorted(p.relative_to(copy / "tasks").parts[::2] for p in (copy / "tasks").rglob("task-*.json"))
    assert stored == [(s, f"task-{i}.json") for s in "AE" for i in range(3)]  # C was skipped
    rows = len(pooled["optimizers"])

    # as if stopped after A's tasks 0 and 2; and one more task asked for: tasks 1 and 3 run, 0 and 2 are read back
    next(copy.glob("tasks/A/*/task-1.json")).unlink()
    again = ev.run_evaluation(cfg, [env["psi"]], out=str(copy), tasks=4, settings=["A"], workers=1, progress=False)
    assert again["meta"]["resumed"] == {"tasks": 2, "rows": 2 * rows}
    old, new = pooled["settings"]["A"]["per_task"], again["settings"]["A"]["per_task"]
    assert new["task_index"] == [0, 1, 2, 3] and new["task_seed"][:3] == old["task_seed"]
    for opt in ("L3RS", "Adam (const), 1e-3", "Adam (cosine, head), 1e-2"):
        assert [new["loss"][opt][i] for i in (0, 2)] == [old["loss"][opt][i] for i in (0, 2)]  # read back: exact
        assert [new["accuracy"][opt][i] for i in (0, 2)] == [old["accuracy"][opt][i] for i in (0, 2)]
    # task 1 ran again, in this process instead of the pool: the same task (accuracy within one eval image)
    np.testing.assert_allclose(new["accuracy"]["L3RS"][1], old["accuracy"]["L3RS"][1], atol=1.01 / 64)

    # another ψ beside the same baselines: only its row runs, every other row of tasks 0-1 is read back
    opt_cfg = L3RSConfig(init_lr=3e-3)
    psi2 = init_psi(opt_cfg, ev.model_params_shapes(cfg), jax.random.key(8))
    meta = {"run_name": "other", "model": "small_cnn", "dataset": "sklearn_digits", "k_range": [5, 10],
            "train_scope": "all", "generations": 1}  # fmt: skip
    save_artifact(str(tmp_path / "psi2"), psi2, opt_cfg, meta)
    both = ev.run_evaluation(cfg, [env["psi"], str(tmp_path / "psi2")], out=str(copy), tasks=2, settings=["A"],
                             workers=1, progress=False)  # fmt: skip
    assert len(both["optimizers"]) == rows + 1 and both["meta"]["resumed"] == {"tasks": 0, "rows": 2 * rows}
    first = both["optimizers"][0]["name"]
    assert both["settings"]["A"]["per_task"]["loss"][first] == new["loss"]["L3RS"][:2]
    assert all(len(json.loads(p.read_text())["rows"]) == rows + (1 if p.name in ("task-0.json", "task-1.json")
                                                                 else 0)
               for p in copy.glob("tasks/A/*/task-*.json"))  # fmt: skip

    # the keys: how many tasks, where, which settings and which rows are not in a setting's key; what a task computes is
    specs, _ = ev.plan_settings(cfg, ["A"])
    opts = ev.build_optimizers(cfg, ev.load_artifacts([env["psi"]]))
    key = setting_key(cfg, specs[0])
    same = cfg.replace(evaluate={"tasks": 9, "workers": 2, "settings": ["A"], "adam_lrs": [1e-4]},
                       run={"name": "another-run"}, nes={"sigma": 0.1})  # fmt: skip
    assert setting_key(same, specs[0]) == key
    assert setting_key(cfg.replace(run={"seed": 1}), specs[0]) != key
    assert setting_key(cfg.replace(evaluate={"k_grid": [5, 10, 40]}), specs[0]) != key
    assert setting_key(cfg.replace(task={"batch_size": 16}), specs[0]) != key
    assert setting_key(cfg.replace(evaluate={"seed": 1}), specs[0]) != key
    # θ0 enters by its bytes, not its path: a copied checkpoint keeps the key, one changed byte does not
    moved = cfg.replace(model={"checkpoint": str(shutil.copytree(specs[0].checkpoint, tmp_path / "moved-theta0"))})
    (moved_spec,), _ = ev.plan_settings(moved, ["A"])
    assert moved_spec.checkpoint != specs[0].checkpoint and setting_key(moved, moved_spec) == key
    f = sorted((tmp_path / "moved-theta0").iterdir())[-1]
    f.write_bytes(f.read_bytes() + b"\0")
    assert setting_key(moved, moved_spec) != key
    assert len({row_key(o) for o in opts}) == len(opts)  # every row computes something else
    # an unreadable or foreign task file is not trusted: that task runs again
    journal = TaskJournal(str(copy), cfg, specs, opts)
    seeds = ev.eval_task_seeds(cfg, "A", 4)
    assert len(journal.load("A", 0, seeds[0])) == rows and journal.load("A", 0, seeds[1]) == {}
    next(copy.glob("tasks/A/*/task-0.json")).write_text("{not json")
    assert journal.load("A", 0, seeds[0]) == {}
    plan = journal.plan(specs, {"A": seeds})
    assert [int(p.indices[0]) for p in plan.done["A"]] == [1, 2, 3] and list(plan.todo) == [("A", 0)]
    assert plan.rows_stored == 3 * rows
    assert journal.missing(journal.load("A", 1, seeds[1])) == []


def test_refuses_bad_inputs_before_any_work(env, tmp_path, capsys):
    cfg = env["cfg"]
    missing = cfg.replace(model={"checkpoint": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="model.checkpoint"):
        ev.run_evaluation(missing, [], out=str(tmp_path / "o"), settings=["A"], workers=1, progress=False)
    with pytest.raises(ConfigError, match="evaluate.settings"):
        ev.run_evaluation(cfg, [], out=str(tmp_path / "o"), settings=["Z"], workers=1, progress=False)
    wrong = tmp_path / "resnet-checkpoint"
    wrong.mkdir()
    (wrong / "meta.json").write_text(json.dumps({"model": "resnet18"}))
    with pytest.raises(ConfigError, match="evaluate.other_checkpoint: .* 'resnet18' model"):
        ev.run_evaluation(
            cfg.replace(evaluate={"other_checkpoint": str(wrong)}), [], out=str(tmp_path / "o"), settings=["C"],
            workers=1, progress=False,
        )  # fmt: skip
    other_model = cfg.replace(model={"name": "resnet18"})
    with pytest.raises(ValueError, match="meta-trained for 'small_cnn'"):
        ev.build_optimizers(other_model, ev.load_artifacts([env["psi"]]))
    args = argparse.Namespace(psi=[str(tmp_path / "no-psi")], tasks=1, out=str(tmp_path / "o"))
    assert ev.run_evaluation_cli(args, cfg) == 2
    assert "no ψ artifact" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_velo_og_checkpoint_adds_its_rows_beside_the_artifacts(env, tmp_path):
    """`l3rs evaluate --velo-og FILE`: a learned_optimization hyper_v2 file (written here by our own writer: the
    published one cannot be downloaded offline) becomes the rows "VeLO (og)" and "VeLO (og, head)"."""
    from l3rs.optim import VeLOConfig, save_hyper_v2

    config = VeLOConfig(lstm_hidden_size=8, param_inits=2, adam_skip=False)
    path = str(tmp_path / "velo_og.msgpack")
    save_hyper_v2(path, config.init(None, jax.random.key(3)), config)
    report = ev.run_evaluation(env["cfg"], [env["psi"]], out=str(tmp_path / "r"), tasks=1, settings=["A"], workers=1,
                               progress=False, velo_og=path)  # fmt: skip
    rows = {o["name"]: o for o in report["optimizers"]}
    assert rows["VeLO (og)"]["train_scope"] == "all" and rows["VeLO (og, head)"]["train_scope"] == "head"
    assert rows["VeLO (og)"]["kind"] == "learned" and rows["L3RS"]["kind"] == "learned"
    accs = {r["optimizer"]: r["mean_acc"] for r in report["settings"]["A"]["rows"] if r["K"] == K_GRID[0]}
    assert set(accs) >= {"L3RS", "VeLO (og)", "VeLO (og, head)"}
    assert all(a is None or 0.0 <= a <= 1.0 for a in accs.values())
    assert "VeLO (og, head)" in (tmp_path / "r" / "report.md").read_text()


def test_an_artifact_of_another_family_alone_is_evaluated_without_fig4(env, tmp_path):
    """`l3rs evaluate` on an FC-LOpt run (its own config's default): rows labelled by family; Fig. 4 (L3RS's λ and μ
    per layer) is left out instead of failing."""
    from l3rs.artifact import save_artifact
    from l3rs.optim import FCLoptConfig

    config = FCLoptConfig()
    theta = config.init(None, jax.random.key(5))
    meta = {"run_name": "fc", "model": "small_cnn", "dataset": "sklearn_digits", "k_range": [5, 10],
            "train_scope": "all", "generations": 1}  # fmt: skip
    save_artifact(str(tmp_path / "psi"), theta, config, meta)
    cfg = env["cfg"].replace(optimizer={"family": "fc_lopt"})
    report = ev.run_evaluation(cfg, [str(tmp_path / "psi")], out=str(tmp_path / "r"), tasks=1, settings=["A"],
                               workers=1, progress=False)  # fmt: skip
    names = [o["name"] for o in report["optimizers"]]
    assert names[:2] == ["FC-LOpt", "FC-LOpt ψ₀"] and "L3RS" not in names
    assert "fig4" not in report["files"] and not (tmp_path / "r" / "fig4_layer_stats.png").exists()
    assert (tmp_path / "r" / "fig3_meta_evaluation.png").stat().st_size > 10_000

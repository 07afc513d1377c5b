"""examples/your_domain end to end at toy size, as its README runs it: a model defined in a file outside the package,
an offline dataset with a custom class split. θ0 (`l3rs.pretrain`, what `l3rs pretrain` calls) → `l3rs submit` to a
real local Ray head (the job and its workers import the user's module from the uploaded working_dir) →
`l3rs.evaluate` (what `l3rs evaluate` calls) on 2 held-out tasks → ψ used with `l3rs.load` in a plain optax loop on
the user's model."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from _local_head import local_head, run_l3rs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "your_domain"
CONFIG = "examples/your_domain/your_domain.toml"
pytestmark = pytest.mark.ray


def l3rs_cli(*args: str, env: dict[str, str], cwd: Path) -> str:
    return run_l3rs(*args, env=env, cwd=cwd, timeout=240)  # the example's commands compile a user model


@pytest.fixture
def head(tmp_path):
    with local_head(tmp_path / "cluster", num_cpus=1) as (address, _, env):
        yield address, env


def test_your_domain_example_end_to_end(head, tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import l3rs as lib
    from l3rs.checkpoint import read_theta0
    from l3rs.data import load, normalize
    from l3rs.models import create, fresh_head

    address, env = head
    # The user's project: the example's files at the same relative paths, run from its root (not the l3rs repo).
    work = tmp_path / "project"
    shutil.copytree(EXAMPLE, work / "examples" / "your_domain")
    runs = tmp_path / "runs"
    toy = [f"run.storage={json.dumps(str(runs))}", f"model.checkpoint={json.dumps(str(runs / 'theta0'))}",
           f"pretrain.output={json.dumps(str(runs / 'theta0'))}", "pretrain.steps=30", "nes.population_size=2",
           "nes.meta_batch_size=1", "nes.generations=1", "task.k_min=3", "task.k_max=6", "task.batch_size=16",
           "task.eval_batch_size=32", "workers.max_workers=1", "evaluate.k_grid=[5, 10]",
           "evaluate.adam_lrs=[1e-2]", "evaluate.head_only_baselines=false"]  # fmt: skip
    sets = [a for s in toy for a in ("--set", s)]

    # θ0 and the evaluation run in this process, through the Python API the CLI commands call (saves two
    # interpreter starts); meta-training goes through `l3rs submit`, to a real head.
    monkeypatch.chdir(work)
    cfg = lib.Config.from_toml(CONFIG).replace({s.split("=", 1)[0]: json.loads(s.split("=", 1)[1]) for s in toy})
    pretrained = lib.pretrain(cfg, progress=False).meta
    assert pretrained["model"] == "mynet:DigitsMLP" and pretrained["dataset"] == "sklearn_digits"
    meta = json.loads((runs / "theta0" / "meta.json").read_text())
    assert meta["pretrain_classes"] == [0, 1, 2, 3] and meta["model_options"] == {"hidden": [64, 32]}

    out = l3rs_cli("submit", "--address", address, "--config", CONFIG, *sets, env=env, cwd=work)
    job_id = next(line.split()[1] for line in out.splitlines() if line.startswith("job:"))
    deadline, status = time.monotonic() + 600, {}  # a hang guard (~40 s on an idle 2-core machine)
    while time.monotonic() < deadline:
        status = json.loads(l3rs_cli("status", job_id, "--address", address, env=env, cwd=work))
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    logs = l3rs_cli("logs", job_id, "--address", address, env=env, cwd=work)
    assert status["status"] == "SUCCEEDED", logs
    assert "[your-domain] gen 1/1" in logs

    psi = runs / "your-domain" / "psi"
    art = json.loads((psi / "metadata.json").read_text())
    assert art["model"] == "mynet:DigitsMLP" and art["model_head"] == "classifier"
    assert art["model_options"] == {"hidden": [64, 32]}
    assert art["classes"] == {"pretrain": [0, 1, 2, 3], "meta_train": [4, 5, 6], "meta_test": [7, 8, 9]}
    assert "classifier/kernel" in art["layer_paths"] and "dense0/kernel" in art["layer_paths"]

    report_dir = tmp_path / "report"
    result = lib.evaluate(cfg, psi=str(psi), tasks=2, workers=1, settings="A", out=str(report_dir), progress=False)
    assert "L3RS" in result.summary and set(result.accuracy("A")["L3RS"]) == {5, 10}
    report = json.loads((report_dir / "report.json").read_text())
    rows = report["settings"]["A"]["rows"]
    assert {r["n_tasks"] for r in rows} == {2} and any(r["optimizer"].startswith("L3RS") for r in rows)
    assert report["meta"]["config"]["data"]["classes"]["meta_test"] == "rest"

    # ψ in a plain optax loop on the user's model: fine-tune θ0 on the held-out digits 7, 8, 9.
    sys.path.insert(0, str(work / "examples" / "your_domain"))
    try:
        module = create("mynet:DigitsMLP", 3, hidden=(64, 32))
    finally:
        sys.path.remove(str(work / "examples" / "your_domain"))
    variables = read_theta0(str(runs / "theta0"))[0]
    params = fresh_head(variables["params"], jax.random.key(0), 3, "classifier")
    data = load("sklearn_digits", "train", classes=[7, 8, 9])
    x, y = normalize(data.images[:96]), jnp.asarray(data.labels[:96] - 7)
    tx = lib.load(str(psi), total_steps=20, params=params)
    state = tx.init(params)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, x), y).mean()

    first = float(loss_fn(params))
    for _ in range(20):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    assert np.isfinite(float(loss_fn(params))) and float(loss_fn(params)) < first

    # A model with other layers is refused by l3rs.load.
    other = create("small_cnn", 3)
    other_params = jax.eval_shape(lambda k: other.init(k, jnp.zeros((1, 16, 16, 1)), train=False), jax.random.key(0))
    with pytest.raises(ValueError, match="layers do not match"):
        lib.load(str(psi), total_steps=20, params=other_params["params"])

"""Meta-evaluation (paper §5 "Meta-Evaluation and Baselines", Fig. 3 A–F, Fig. 4, Appendix C Tables 5–10).

For ψ artifacts (and ψ₀, the untrained start of meta-training, as a reference), sample held-out tasks per setting from
the meta-test distribution (``TaskDistribution(stage="meta_test")``: eval batch from the test split), fine-tune
for every K of ``evaluate.k_grid`` and report mean ± std eval accuracy and loss over tasks. The baselines run on the
very same tasks (common random numbers): Adam with a cosine schedule and with a constant learning rate over
``evaluate.adam_lrs``, and both again on the classifier head only. "Best Adam" is, per K, the Adam variant (schedule,
scope, learning rate) with the highest mean accuracy: a per-K oracle tuning of the baseline, the paper's choice.

Settings (Fig. 3): A in-domain; B the other dataset with the in-domain checkpoint; C the other checkpoint on the
in-domain dataset; D both; E a random initialisation. F (speedup) compares, per accuracy level that best Adam reaches at
a K of the grid, the K at which L3RS's mean-accuracy curve reaches that level (linear in log K).

Cost: Adam (const) runs once per task to the largest K, evaluated on the way at every K (``InnerLoop`` ``eval_at``);
Adam (cosine) and L3RS run once per K (the schedule and L3RS's time features depend on K). K is traced, so one
compile serves every K and task of an optimizer kind. :func:`evaluate_setting` is pure work over task seeds and can
be sharded (``shard=(i, n)``); :func:`run_evaluation` runs the shards in a spawn process pool, one single-threaded
XLA process per core, and merges by task index, so the numbers do not depend on the sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from l3rs import storage
from l3rs.config import Config, ConfigError

__all__ = [
    "SETTINGS",
    "BEST_ADAM",
    "SettingSpec",
    "OptimizerSpec",
    "Artifact",
    "SettingResult",
    "eval_task_seed",
    "eval_task_seeds",
    "eval_distribution",
    "setting_spec",
    "load_artifacts",
    "build_optimizers",
    "evaluate_setting",
    "merge_results",
    "trace_layer_stats",
    "mean_std",
    "best_per_k",
    "interp_steps",
    "speedup_table",
    "win_counts",
    "summarize_setting",
    "run_evaluation",
    "run_evaluation_cli",
]

BEST_ADAM = "best Adam"
XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Evaluation tasks live in their own seed stream: SeedSequence([run seed, EVAL_TAG, evaluate.seed, stream, index]),
# mapped to [2^32, 2^64), so they can never equal a meta-training task seed (task_seed() gives 32-bit values).
EVAL_TAG = int.from_bytes(b"eval", "big")
_EVAL_SEED_OFFSET = 1 << 32

SETTINGS: Mapping[str, str] = {
    "A": "In-domain",
    "B": "Other evaluation dataset",
    "C": "Other checkpoint",
    "D": "Other checkpoint and dataset",
    "E": "Random initialisation",
}


# ----------------------------------------------------------------------------------------------------------------
# settings, seeds and task distributions
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """One evaluation setting of Fig. 3: where θ0 comes from and which dataset the tasks are drawn from."""

    name: str  # "A".."E"
    title: str
    description: str
    dataset: str
    checkpoint: str  # a checkpoint folder/URI, or "random"


def _absolute(uri: str) -> str:
    if uri == "random" or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def setting_spec(cfg: Config, name: str) -> SettingSpec:
    """Settings A–E (paper §5, Fig. 3) for this config; ``evaluate.other_*`` name the out-of-domain parts."""
    home, ckpt = cfg.data.dataset, _absolute(cfg.model.checkpoint)
    other, other_ckpt = cfg.evaluate.other_dataset, _absolute(cfg.evaluate.other_checkpoint)
    table = {
        "A": (home, ckpt, f"θ0 pretrained on {home}; tasks from {home} (meta-test classes, test-split eval batch)"),
        "B": (other, ckpt, f"θ0 pretrained on {home}; tasks from {other}"),
        "C": (home, other_ckpt, f"θ0 = the other checkpoint ({cfg.evaluate.other_checkpoint}); tasks from {home}"),
        "D": (other, other_ckpt, f"θ0 = the other checkpoint ({cfg.evaluate.other_checkpoint}); tasks from {other}"),
        "E": (home, "random", f"θ0 = random initialisation (seed {cfg.run.seed}); tasks from {home}"),
    }
    if name not in table:
        raise ValueError(f"setting: {name!r} must be one of {sorted(table)}.")
    dataset, checkpoint, description = table[name]
    return SettingSpec(name, SETTINGS[name], description, dataset, checkpoint)


def _stream_id(stream: str) -> int:
    return int.from_bytes(stream.encode(), "big")


def eval_task_seed(run_seed: int, eval_seed: int, stream: str, index: int) -> int:
    """Seed of evaluation task ``index`` of ``stream`` (a setting name such as ``"A"``).

    Pure and machine independent. The values lie in [2^32, 2^64) while meta-training seeds
    (:func:`l3rs.meta.tasks.task_seed`) are 32-bit, so a held-out task never repeats a meta-training task.
    """
    ss = np.random.SeedSequence([int(run_seed), EVAL_TAG, int(eval_seed), _stream_id(stream), int(index)])
    return _EVAL_SEED_OFFSET + int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def eval_task_seeds(cfg: Config, stream: str, num_tasks: int) -> list[int]:
    return [eval_task_seed(cfg.run.seed, cfg.evaluate.seed, stream, i) for i in range(num_tasks)]


def eval_distribution(cfg: Config, dataset: str, num_steps: int | None = None):
    """The meta-test task distribution of ``dataset``: held-out classes, eval batch from the test split.

    Every task carries ``num_steps`` (default: the largest K of the grid) training batches; shorter runs use a prefix
    of them, so the runs of one task at different K see the same first batches.
    """
    from l3rs.meta.tasks import TaskDistribution

    k = int(num_steps or max(cfg.evaluate.k_grid))
    return TaskDistribution(
        dataset=cfg.data.spec(dataset),
        stage="meta_test",
        num_classes=cfg.task.num_classes,
        batch_size=cfg.task.batch_size,
        eval_batch_size=cfg.task.eval_batch_size,
        k_min=k,
        k_max=k,
        data_dir=cfg.data.data_dir,
    )


# ----------------------------------------------------------------------------------------------------------------
# optimizers under test
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded ψ artifact: ``label`` names its rows in the report."""

    label: str
    uri: str
    psi: Any  # the meta-parameters (ψ for L3RS)
    config: Any  # a learned-optimizer family config (l3rs.L3RSConfig, l3rs.FCLoptConfig, l3rs.VeLOConfig)
    meta: dict[str, Any]
    train_scope: str | None = None  # overrides the artifact's meta["train_scope"] (VeLO (og, head))


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizerSpec:
    """One optimizer row of the tables.

    Attributes:
      name: the row label ("L3RS", "L3RS ψ₀", "FC-LOpt", "VeLO (ft)", "Adam (cosine), 1e-3", ...).
      kind: ``"learned"`` (any learned-optimizer family) or ``"adam"``.
      group: the line family in the plots (the learned family's name such as ``"l3rs"`` or ``"velo"``, ``"psi0"``,
        ``"adam_cosine"``, ``"adam_const"``, ``"adam_cosine_head"``, ``"adam_const_head"``).
      train_scope: ``"all"`` or ``"head"``.
      schedule: Adam's ``"constant"`` or ``"cosine"`` schedule (None for learned optimizers).
      learning_rate: Adam's (peak) learning rate (None for learned optimizers).
      psi, config: a learned optimizer's meta-parameters (numpy leaves) and its family config (None for Adam).
    """

    name: str
    kind: Literal["learned", "adam"]
    group: str
    train_scope: str = "all"
    schedule: str | None = None
    learning_rate: float | None = None
    psi: Any = None
    config: Any = None

    @property
    def is_adam(self) -> bool:
        return self.kind == "adam"

    def family(self) -> tuple:
        """Optimizers of one family share one compiled inner loop (their parameters are traced)."""
        if self.kind == "adam":
            return ("adam", self.schedule, self.train_scope)
        shapes = tuple(np.shape(x) for x in _tree_leaves(self.psi))
        paths = getattr(self.psi, "layer_paths", ())
        return ("learned", json.dumps(self.config.to_dict(), sort_keys=True), paths, shapes, self.train_scope)

    def params(self) -> np.ndarray:
        """The traced optimizer parameters: the flat meta-parameter vector, or Adam's learning rate."""
        if self.kind == "adam":
            return np.float32(self.learning_rate)
        from l3rs.optim import meta_to_vector

        return np.asarray(meta_to_vector(self.psi), np.float32)


def _tree_leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def format_lr(lr: float) -> str:
    """1e-3 → "1e-3", 3e-05 → "3e-5", 0.0025 → "2.5e-3" (the paper's row labels)."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def artifact_label(config: Any, meta: dict[str, Any]) -> str:
    """The report row of an artifact: the family's label; VeLO meta-trained by this service is "VeLO (ft)"."""
    if meta.get("label"):
        return str(meta["label"])
    return f"{config.label} (ft)" if config.family == "velo" else config.label


def load_artifacts(uris: Sequence[str]) -> list[Artifact]:
    """Loads and verifies ψ artifacts of any learned-optimizer family.

    Rows are labelled by family ("L3RS", "FC-LOpt", "VeLO (ft)"); two artifacts of one family are told apart by
    their run names ("L3RS (<run name>)").
    """
    from l3rs.artifact import load_psi

    loaded = []
    for uri in uris:
        psi, config, meta = load_psi(uri)
        loaded.append((uri, psi, config, meta))
    bases = [artifact_label(c, m) for _, _, c, m in loaded]
    labels: list[str] = []
    for i, (uri, _, _, meta) in enumerate(loaded):
        label = bases[i]
        if bases.count(label) > 1:
            run = meta.get("run_name") or os.path.basename(os.path.normpath(os.path.dirname(uri.rstrip("/"))))
            label = f"{bases[i]} ({run})"
            if label in labels:
                label = f"{bases[i]} ({run} #{i + 1})"
        labels.append(label)
    return [Artifact(lab, u, p, c, m) for lab, (u, p, c, m) in zip(labels, loaded, strict=True)]


def velo_og_artifacts(path: str) -> list[Artifact]:
    """VeLO (og): the published VeLO weights (a learned_optimization ``hyper_v2`` checkpoint file the user has
    downloaded) as two rows, fine-tuning the whole network and only the head (the paper's "VeLO (og, head)")."""
    import jax

    from l3rs.optim.velo_checkpoint import load_hyper_v2

    theta, config = load_hyper_v2(path)
    theta = jax.tree.map(np.asarray, theta)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    meta = {"label": "VeLO (og)", "source": "learned_optimization hyper_v2 checkpoint", "sha256": sha}
    return [
        Artifact("VeLO (og)", path, theta, config, meta, train_scope="all"),
        Artifact("VeLO (og, head)", path, theta, config, {**meta, "label": "VeLO (og, head)"}, train_scope="head"),
    ]


def _model_params_shapes(cfg: Config) -> Any:
    from l3rs.meta.runner import model_shapes

    return model_shapes(cfg)["params"]


def build_optimizers(cfg: Config, artifacts: Sequence[Artifact]) -> list[OptimizerSpec]:
    """The rows under test, in table order: the artifacts, ψ₀, Adam (cosine), Adam (const), and head-only Adam.

    ψ₀ is the start of meta-training (``config.init`` with ``run.seed``) of the first artifact's family
    (``cfg.optimizer`` without artifacts).

    Raises:
      ValueError: an artifact was meta-trained for another model or other layers than ``model.name``.
    """
    import jax

    from l3rs.optim import layer_paths

    for art in artifacts:
        model = art.meta.get("model")
        if model is not None and model != cfg.model.name:
            raise ValueError(
                f"psi: the artifact at {art.uri!r} was meta-trained for {model!r}; model.name is {cfg.model.name!r}."
            )
    shapes = _model_params_shapes(cfg)
    paths = layer_paths(shapes)
    specs = []
    for art in artifacts:
        known = getattr(art.psi, "layer_paths", None)  # None: a model-agnostic family
        missing = [p for p in paths if known is not None and p not in set(known)]
        if missing:
            raise ValueError(
                f"psi: the artifact at {art.uri!r} does not know the layers {missing[:5]} of {cfg.model.name!r}."
            )
        scope = art.train_scope or art.meta.get("train_scope", cfg.task.train_scope)
        group = art.config.family
        specs.append(OptimizerSpec(art.label, "learned", group, scope, psi=art.psi, config=art.config))
    config0 = artifacts[0].config if artifacts else cfg.optimizer
    psi0 = jax.tree.map(np.asarray, config0.init(shapes, jax.random.key(cfg.run.seed)))
    specs.append(OptimizerSpec(f"{config0.label} ψ₀", "learned", "psi0", cfg.task.train_scope, psi=psi0,
                               config=config0))  # fmt: skip
    scopes = ("all", "head") if cfg.evaluate.head_only_baselines else ("all",)
    for scope in scopes:
        for schedule, short in (("cosine", "cosine"), ("constant", "const")):
            for lr in cfg.evaluate.adam_lrs:
                tag = short if scope == "all" else f"{short}, head"
                group = f"adam_{short}" if scope == "all" else f"adam_{short}_head"
                specs.append(OptimizerSpec(f"Adam ({tag}), {format_lr(lr)}", "adam", group, scope, schedule, float(lr)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: duplicate optimizer names {names} (repeated learning rates?).")
    return specs


# ----------------------------------------------------------------------------------------------------------------
# the work: one setting, a shard of its tasks
# ----------------------------------------------------------------------------------------------------------------
class SettingResult(NamedTuple):
    """Per-task results of (a shard of) one setting.

    ``accuracy[name]`` and ``loss[name]`` are [tasks, len(k_grid)] float64 arrays, rows in ``indices`` order (the
    task's index in the setting's seed list). ``compiles`` counts the inner-loop traces this part caused (0 when a
    process reused its loops) and ``seconds`` the wall time of its work.
    """

    setting: str
    k_grid: tuple[int, ...]
    indices: np.ndarray
    seeds: np.ndarray
    accuracy: dict[str, np.ndarray]
    loss: dict[str, np.ndarray]
    compiles: int = 0
    seconds: float = 0.0


class _SettingRunner:
    """θ0, the setting's task images and one compiled inner loop per optimizer family."""

    def __init__(self, cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> None:
        from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, learned_optimizer_fn
        from l3rs.meta.runner import load_theta0, model_for
        from l3rs.meta.tasks import load_task_pool

        self.k_grid = tuple(int(k) for k in cfg.evaluate.k_grid)
        self.dist = eval_distribution(cfg, setting.dataset)
        self.pool = load_task_pool(self.dist)
        variables0, _ = load_theta0(cfg, setting.checkpoint)
        module = model_for(cfg)
        self.optimizers = list(optimizers)
        self.params = [o.params() for o in self.optimizers]
        self.loops: dict[tuple, Any] = {}
        for o in self.optimizers:
            key = o.family()
            if key in self.loops:
                continue
            fn = learned_optimizer_fn(o.config, o.psi) if o.kind == "learned" else adam_optimizer_fn(o.schedule)
            self.loops[key] = InnerLoop(
                module,
                variables0,
                self.pool,
                fn,
                num_classes=cfg.task.num_classes,
                train_scope=o.train_scope,
                head=cfg.model.head,
            )
        self._counted = 0

    def new_compiles(self) -> int:
        total = sum(loop.compiles for loop in self.loops.values())
        new, self._counted = total - self._counted, total
        return new

    def run_task(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        import jax

        from l3rs.meta.tasks import sample_task

        task = sample_task(int(seed), self.dist, self.pool)
        k_max = self.k_grid[-1]
        pending = []  # dispatch everything, then wait once (the runs queue up on the device)
        for o, p in zip(self.optimizers, self.params, strict=True):
            loop = self.loops[o.family()]
            if o.kind == "adam" and o.schedule == "constant":
                # K-independent: one run to the largest K, evaluated on the way at every K of the grid.
                pending.append(loop.run_arrays(p, task, k_max, eval_at=self.k_grid))
            else:
                # Adam (cosine) and L3RS depend on K (schedule, time features): one run per K.
                pending.append([loop.run_arrays(p, task, k) for k in self.k_grid])
        got = jax.device_get(pending)
        acc, loss = {}, {}
        for o, out in zip(self.optimizers, got, strict=True):
            if isinstance(out, dict):
                acc[o.name] = np.asarray(out["curve_accuracy"], np.float64)
                loss[o.name] = np.asarray(out["curve_loss"], np.float64)
            else:
                acc[o.name] = np.asarray([r["accuracy"] for r in out], np.float64)
                loss[o.name] = np.asarray([r["loss"] for r in out], np.float64)
        return acc, loss


# Per process: the runners of the settings seen last (data and compiled loops stay), at most one per setting.
_RUNNERS: dict[str, _SettingRunner] = {}
_MAX_RUNNERS = len(SETTINGS)


def _fingerprint(cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(dataclasses.asdict(setting), sort_keys=True).encode())
    for o in optimizers:
        h.update(repr((o.name, o.family())).encode())
        h.update(np.asarray(o.params(), np.float32).tobytes())
    return h.hexdigest()


def _runner_for(cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> _SettingRunner:
    key = _fingerprint(cfg, setting, optimizers)
    runner = _RUNNERS.pop(key, None)
    if runner is None:
        while len(_RUNNERS) >= _MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))  # least recently used
        runner = _SettingRunner(cfg, setting, optimizers)
    _RUNNERS[key] = runner
    return runner


def evaluate_setting(
    cfg: Config,
    setting: SettingSpec | str,
    optimizers: Sequence[OptimizerSpec],
    task_seeds: Sequence[int],
    *,
    shard: tuple[int, int] = (0, 1),
    on_task: Callable[[int], None] | None = None,
) -> SettingResult:
    """Runs every optimizer at every K of ``cfg.evaluate.k_grid`` on the tasks ``task_seeds[i::n]``.

    Pure work: the result of a task depends only on (config, setting, optimizer, task seed), so shards can run in
    any process and :func:`merge_results` gives the same numbers for any sharding. The process keeps the recent
    settings' data and compiled loops, so further shards of the same setting compile nothing.

    Args:
      cfg: the validated config (``evaluate.k_grid``, task shape, model).
      setting: a :class:`SettingSpec` or a setting name ("A".."E").
      optimizers: from :func:`build_optimizers`.
      task_seeds: all task seeds of the setting (:func:`eval_task_seeds`).
      shard: ``(i, n)``: this call runs the tasks with index ≡ i (mod n).
      on_task: called with a task's index when it is done (progress).
    """
    start = time.perf_counter()
    spec = setting_spec(cfg, setting) if isinstance(setting, str) else setting
    i, n = shard
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"shard: {shard!r} must be (i, n) with 0 <= i < n.")
    runner = _runner_for(cfg, spec, optimizers)
    indices = list(range(i, len(task_seeds), n))
    acc = {o.name: np.zeros((len(indices), len(runner.k_grid))) for o in optimizers}
    loss = {o.name: np.zeros((len(indices), len(runner.k_grid))) for o in optimizers}
    for row, index in enumerate(indices):
        a, lo = runner.run_task(task_seeds[index])
        for name in acc:
            acc[name][row], loss[name][row] = a[name], lo[name]
        if on_task is not None:
            on_task(index)
    return SettingResult(
        setting=spec.name,
        k_grid=runner.k_grid,
        indices=np.asarray(indices, np.int64),
        seeds=np.asarray([task_seeds[j] for j in indices], np.uint64),
        accuracy=acc,
        loss=loss,
        compiles=runner.new_compiles(),
        seconds=time.perf_counter() - start,
    )


def merge_results(parts: Sequence[SettingResult]) -> SettingResult:
    """Concatenates shards of one setting, rows sorted by task index (independent of how the tasks were split)."""
    if not parts:
        raise ValueError("merge_results: no parts.")
    first = parts[0]
    if any(p.setting != first.setting or p.k_grid != first.k_grid for p in parts):
        raise ValueError("merge_results: parts of different settings or K grids.")
    indices = np.concatenate([p.indices for p in parts])
    if len(set(indices.tolist())) != len(indices):
        raise ValueError("merge_results: a task index appears in two parts.")
    order = np.argsort(indices, kind="stable")

    def cat(field: str) -> dict[str, np.ndarray]:
        return {k: np.concatenate([getattr(p, field)[k] for p in parts])[order] for k in getattr(first, field)}

    return SettingResult(
        setting=first.setting,
        k_grid=first.k_grid,
        indices=indices[order],
        seeds=np.concatenate([p.seeds for p in parts])[order],
        accuracy=cat("accuracy"),
        loss=cat("loss"),
        compiles=sum(p.compiles for p in parts),
        seconds=sum(p.seconds for p in parts),
    )


# ----------------------------------------------------------------------------------------------------------------
# Fig. 4: μ and λ per layer over one run
# ----------------------------------------------------------------------------------------------------------------
def trace_layer_stats(
    cfg: Config, optimizer: OptimizerSpec, *, num_steps: int = 100, setting: str = "A"
) -> dict[str, Any]:
    """Fine-tunes one held-out task of ``setting`` for ``num_steps`` steps with L3RS and records, after every step,
    the mixing coefficients μ ([L, P]) and step sizes λ ([L]) of every layer (``l3rs.optim.layer_stats``; paper
    Fig. 4, a 100-step run).

    Returns numpy arrays: ``mixing`` [steps, L, P], ``step_norm`` [steps, L], ``train_loss`` [steps], and
    ``layer_paths``, ``directions``, ``eval_accuracy`` (after the run), ``task_seed``, ``optimizer``.
    """
    import jax
    import optax

    from l3rs.data import normalize
    from l3rs.meta.inner import head_only
    from l3rs.meta.runner import load_theta0, model_for
    from l3rs.meta.tasks import load_task_pool, sample_task
    from l3rs.models import fresh_head, head_mask
    from l3rs.optim import L3RSState, l3rs, layer_paths, layer_stats

    if optimizer.kind != "learned" or optimizer.config.family != "l3rs":
        raise ValueError(f"trace_layer_stats: {optimizer.name!r} is not an L3RS optimizer.")
    spec = setting_spec(cfg, setting)
    dist = eval_distribution(cfg, spec.dataset, num_steps)
    pool = load_task_pool(dist)
    seed = eval_task_seed(cfg.run.seed, cfg.evaluate.seed, f"fig4-{setting}", 0)
    task = sample_task(seed, dist, pool)
    variables0, _ = load_theta0(cfg, spec.checkpoint)
    module = model_for(cfg)
    params = fresh_head(variables0["params"], jax.random.key(task.head_seed), cfg.task.num_classes, cfg.model.head)
    model_state = {k: v for k, v in variables0.items() if k != "params"}
    tx = l3rs(optimizer.psi, optimizer.config, num_steps)
    paths = list(layer_paths(params))
    if optimizer.train_scope == "head":
        mask = jax.tree.leaves(head_mask(params, cfg.model.head))
        paths = [p for p, m in zip(paths, mask, strict=True) if m]
        tx = head_only(tx, params, cfg.model.head)
    opt_state = tx.init(params)
    train_images, eval_images = jax.device_put(pool.train_images), jax.device_put(pool.eval_images)

    def loss_fn(params, model_state, x, y, train):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, new_state = module.apply(variables, x, train=True, mutable=list(model_state))
        else:
            logits, new_state = module.apply(variables, x, train=train), model_state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new_state, logits)

    def l3rs_state(state):
        found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, L3RSState)) if
                 isinstance(s, L3RSState)]  # fmt: skip
        return found[0]

    @jax.jit
    def step(params, model_state, opt_state, idx, y):
        x = normalize(train_images[idx])
        (value, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y, True)
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return optax.apply_updates(params, updates), model_state, opt_state, value, layer_stats(l3rs_state(opt_state))

    @jax.jit
    def accuracy(params, model_state):
        _, (_, logits) = loss_fn(params, model_state, normalize(eval_images[task.eval_idx]), task.eval_y, False)
        return (logits.argmax(-1) == task.eval_y).mean()

    mixing, step_norm, losses = [], [], []
    for k in range(num_steps):
        params, model_state, opt_state, value, stats = step(
            params, model_state, opt_state, task.train_idx[k], task.train_y[k]
        )
        mixing.append(stats["mixing"])
        step_norm.append(stats["step_norm"])
        losses.append(value)
    mixing, step_norm, losses = jax.device_get((mixing, step_norm, losses))
    return {
        "optimizer": optimizer.name,
        "setting": setting,
        "task_seed": int(seed),
        "num_steps": int(num_steps),
        "layer_paths": paths,
        "directions": list(optimizer.config.direction_names),
        "mixing": np.asarray(mixing, np.float64),
        "step_norm": np.asarray(step_norm, np.float64),
        "train_loss": np.asarray(losses, np.float64),
        "eval_accuracy": float(accuracy(params, model_state)),
    }


# ----------------------------------------------------------------------------------------------------------------
# the statistics (pure; tests check them against hand-computed values)
# ----------------------------------------------------------------------------------------------------------------
def mean_std(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over tasks (axis 0) of a [tasks, ...] array.

    The std is the population std (ddof = 0): the spread of the task results, as "mean ± std" in the paper's tables.
    A non-finite value (a diverged run's loss) makes that column's mean and std non-finite: it is not hidden.
    """
    x = np.asarray(values, np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("mean_std: need at least one task (axis 0).")
    with np.errstate(invalid="ignore"):
        return x.mean(axis=0), x.std(axis=0)


def best_per_k(mean_accuracy: Mapping[str, Sequence[float]], candidates: Sequence[str] | None = None) -> list[str]:
    """For each K (position), the candidate with the highest mean accuracy (ties: the first in ``candidates``
    order; a NaN never wins). "Best Adam" of the paper: the baseline tuned per K with hindsight.

    Raises:
      ValueError: no candidates, or a K where every candidate is NaN.
    """
    names = list(candidates if candidates is not None else mean_accuracy)
    if not names:
        raise ValueError("best_per_k: no candidates.")
    table = np.asarray([np.asarray(mean_accuracy[n], np.float64) for n in names])  # [C, K]
    best = []
    for j in range(table.shape[1]):
        if np.all(np.isnan(table[:, j])):
            raise ValueError(f"best_per_k: every candidate is NaN at position {j}.")
        col = np.where(np.isnan(table[:, j]), -np.inf, table[:, j])
        best.append(names[int(np.argmax(col))])  # argmax returns the first maximum
    return best


def interp_steps(k_grid: Sequence[float], accuracy: Sequence[float], level: float) -> float:
    """The number of steps at which a mean-accuracy curve first reaches ``level``.

    The curve is known at ``k_grid`` and taken as linear in log K between grid points: between K_a (accuracy a <
    level) and K_b (b ≥ level), K = exp(log K_a + (level − a)/(b − a) · (log K_b − log K_a)). Returns ``k_grid[0]``
    when the first point already reaches the level (the true K may be smaller: a bound), and NaN when the curve never
    reaches it within the grid.
    """
    ks = np.asarray(k_grid, np.float64)
    acc = np.asarray(accuracy, np.float64)
    if ks.shape != acc.shape or ks.ndim != 1 or len(ks) == 0:
        raise ValueError(f"interp_steps: k_grid and accuracy need the same 1-D shape, got {ks.shape}, {acc.shape}.")
    for j in range(len(ks)):
        if not acc[j] >= level:  # NaN: not reached
            continue
        if j == 0:
            return float(ks[0])
        a, b = acc[j - 1], acc[j]
        if not np.isfinite(a) or b == a:
            return float(ks[j])
        t = (level - a) / (b - a)
        return float(np.exp(np.log(ks[j - 1]) + t * (np.log(ks[j]) - np.log(ks[j - 1]))))
    return math.nan


def speedup_table(
    k_grid: Sequence[int], baseline_accuracy: Sequence[float], l3rs_accuracy: Sequence[float]
) -> list[dict[str, Any]]:
    """Fig. 3 F: for each K of the grid, the accuracy level the baseline (best Adam) reaches at K, the steps L3RS
    needs to reach it (:func:`interp_steps` on its mean-accuracy curve) and the speedup K / K_L3RS.

    Each row: ``k_baseline``, ``level``, ``k_l3rs``, ``speedup`` and ``bound``: ``""`` (interpolated), ``">="``
    (L3RS is already there at the first K of the grid: the speedup is at least the value given) or ``"never"``
    (L3RS does not reach the level within the grid; ``k_l3rs`` and ``speedup`` are NaN).
    """
    rows = []
    for k, level in zip(k_grid, baseline_accuracy, strict=True):
        k_l3rs = interp_steps(k_grid, l3rs_accuracy, float(level))
        if math.isnan(k_l3rs):
            bound, speedup = "never", math.nan
        else:
            bound = ">=" if l3rs_accuracy[0] >= level else ""
            speedup = float(k) / k_l3rs
        rows.append({"k_baseline": int(k), "level": float(level), "k_l3rs": k_l3rs, "speedup": speedup, "bound": bound})
    return rows


def win_counts(l3rs_accuracy: Any, baseline_accuracy: Any) -> list[dict[str, int]]:
    """Per K (column): on how many tasks L3RS's accuracy is higher than / equal to / lower than the baseline's."""
    a = np.asarray(l3rs_accuracy, np.float64)
    b = np.asarray(baseline_accuracy, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_counts: shapes differ: {a.shape} vs {b.shape}.")
    return [
        {"wins": int(np.sum(a[:, j] > b[:, j])), "ties": int(np.sum(a[:, j] == b[:, j])),
         "losses": int(np.sum(a[:, j] < b[:, j]))}
        for j in range(a.shape[1])
    ]  # fmt: skip


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def summarize_setting(result: SettingResult, optimizers: Sequence[OptimizerSpec]) -> dict[str, Any]:
    """Tables of one setting: mean ± std per optimizer and K, best Adam per K, per-task wins of each L3RS row.

    ``rows`` are the long-format records of the CSV (``setting, optimizer, K, mean_acc, std_acc, mean_loss,
    std_loss, n_tasks``; non-finite numbers as None); the last optimizer is ``"best Adam"``.
    """
    ks = list(result.k_grid)
    n = len(result.indices)
    adam = [o.name for o in optimizers if o.is_adam]
    l3rs_rows = [o.name for o in optimizers if not o.is_adam]
    stats = {}
    for name in [o.name for o in optimizers]:
        ma, sa = mean_std(result.accuracy[name])
        ml, sl = mean_std(result.loss[name])
        stats[name] = (ma, sa, ml, sl)
    best = best_per_k({a: stats[a][0] for a in adam}, adam)
    best_acc = np.stack([result.accuracy[best[j]][:, j] for j in range(len(ks))], axis=1)
    best_loss = np.stack([result.loss[best[j]][:, j] for j in range(len(ks))], axis=1)
    stats[BEST_ADAM] = (*mean_std(best_acc), *mean_std(best_loss))
    rows = []
    for name, (ma, sa, ml, sl) in stats.items():
        for j, k in enumerate(ks):
            rows.append(
                {
                    "setting": result.setting,
                    "optimizer": name,
                    "K": int(k),
                    "mean_acc": _finite(ma[j]),
                    "std_acc": _finite(sa[j]),
                    "mean_loss": _finite(ml[j]),
                    "std_loss": _finite(sl[j]),
                    "n_tasks": n,
                }
            )
    wins = {name: win_counts(result.accuracy[name], best_acc) for name in l3rs_rows}
    return {
        "setting": result.setting,
        "k_grid": ks,
        "n_tasks": n,
        "optimizers": list(stats),
        "rows": rows,
        "best_adam": {"K": ks, "variant": best},
        "wins_vs_best_adam": wins,
        "per_task": {
            "task_index": result.indices.tolist(),
            "task_seed": [int(s) for s in result.seeds],
            "accuracy": {k: v.tolist() for k, v in result.accuracy.items()},
            "loss": {k: [[_finite(x) for x in row] for row in v] for k, v in result.loss.items()},
            BEST_ADAM: {"accuracy": best_acc.tolist()},
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# running it: in this process, or in a spawn process pool (one single-threaded XLA process per core)
# ----------------------------------------------------------------------------------------------------------------
def _plan_settings(cfg: Config, settings: Sequence[str] | None) -> tuple[list[SettingSpec], dict[str, str]]:
    """The settings to run and the skipped ones (with the reason); refuses unusable checkpoints before any work."""
    from l3rs.checkpoint import theta0_format
    from l3rs.meta.runner import load_theta0

    names = list(settings if settings is not None else cfg.evaluate.settings)
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise ConfigError(f"evaluate.settings: choose among A B C D E, got {names}.")
    specs, skipped = [], {}
    for name in dict.fromkeys(names):
        spec = setting_spec(cfg, name)
        if spec.checkpoint != "random" and theta0_format(spec.checkpoint) is None:
            if spec.checkpoint == _absolute(cfg.model.checkpoint):
                raise ConfigError(
                    f"model.checkpoint: no pretrained checkpoint at {cfg.model.checkpoint!r} (needed by setting "
                    f"{name}); run `l3rs pretrain --config ...` first."
                )
            skipped[name] = (
                f"setting {name} ({spec.title}) skipped: no pretrained checkpoint at "
                f"{cfg.evaluate.other_checkpoint!r} (evaluate.other_checkpoint). Make it with `l3rs pretrain` and a "
                f"config whose pretrain.output is that path, pretraining on {cfg.evaluate.other_dataset}'s pretrain "
                "classes (for sklearn_digits: jobs/configs/digits_checkpoint.toml)."
            )
            continue
        if spec.checkpoint != "random":
            home = spec.checkpoint == _absolute(cfg.model.checkpoint)
            try:  # the model it holds, and its shapes
                load_theta0(cfg, spec.checkpoint, field="model.checkpoint" if home else "evaluate.other_checkpoint")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        available = len(cfg.data.spec(spec.dataset).meta_test_classes)
        if cfg.task.num_classes > available:
            raise ConfigError(
                f"evaluate.other_dataset: {spec.dataset} has {available} meta-test classes, fewer than "
                f"task.num_classes = {cfg.task.num_classes} (setting {name})."
            )
        specs.append(spec)
    return specs, skipped


def _child_env(cache_dir: str | None) -> dict[str, str]:
    """Environment of an evaluation process: CPU, single-threaded XLA, a shared persistent compilation cache."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} {XLA_SINGLE_THREAD}".strip()
    env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Temporarily sets variables of ``os.environ`` (spawned children copy it when they start)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_child(env: Mapping[str, str]) -> None:
    # The variables are already in the child's environment from its start (before jax was imported); this only
    # guards against a start method that does not copy the parent's environment.
    for k, v in env.items():
        os.environ.setdefault(k, v)
    # One core per process: XLA:CPU's thread pool would otherwise span every core (see l3rs.cpu). Before any
    # computation, so that JAX's threads inherit the affinity.
    from l3rs.cpu import claim_cores

    claim_cores(1)


def _bars(specs: Sequence[SettingSpec], num_tasks: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    return {
        s.name: tqdm(total=num_tasks, desc=f"evaluate {s.name} ({s.title})", unit="task", position=i,
                     disable=not progress, leave=True, mininterval=1.0, file=sys.stderr)
        for i, s in enumerate(specs)
    }  # fmt: skip


def _run_in_process(cfg, specs, optimizers, seeds, trace_opt, progress):
    trace_setting = "A" if any(s.name == "A" for s in specs) else (specs[0].name if specs else None)
    trace_setting = trace_setting if trace_opt is not None else None
    bars = _bars(specs, len(next(iter(seeds.values()))) if seeds else 0, progress)
    results = {}
    try:
        for s in specs:
            results[s.name] = evaluate_setting(
                cfg, s, optimizers, seeds[s.name], on_task=lambda _i, b=bars[s.name]: b.update(1)
            )
        _RUNNERS.clear()  # free the settings' data and loops
        trace = trace_layer_stats(cfg, trace_opt, setting=trace_setting) if trace_setting else None
    finally:
        for b in bars.values():
            b.close()
    return results, trace


def _run_pool(cfg, specs, optimizers, seeds, trace_opt, progress, workers):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    own_cache = None
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not cache_dir:  # settings with the same image shape (A, C, E) then compile once, in either process
        cache_dir = own_cache = tempfile.mkdtemp(prefix="l3rs-eval-xla-")
    env = _child_env(cache_dir)
    num_tasks = len(next(iter(seeds.values()))) if seeds else 0
    trace_setting = "A" if any(s.name == "A" for s in specs) else specs[0].name
    bars = _bars(specs, num_tasks, progress)
    parts: dict[str, list[SettingResult]] = {s.name: [] for s in specs}
    executor = None
    try:
        with _environ(env):  # every child process is started by a submit below, with this environment
            executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_child, initargs=(env,)
            )
            # One job per task: balanced, and the bars move task by task. Round-robin over the settings, so the
            # processes start on different settings (B's image shape differs from A's: two compiles at once) and
            # later settings of an already compiled shape hit the shared compilation cache.
            futures = {}
            for i in range(num_tasks):
                for s in specs:
                    job = executor.submit(evaluate_setting, cfg, s, optimizers, seeds[s.name], shard=(i, num_tasks))
                    futures[job] = s
            trace_future = None
            if trace_opt is not None:
                trace_future = executor.submit(trace_layer_stats, cfg, trace_opt, setting=trace_setting)
        for future in as_completed(futures):
            part = future.result()
            parts[part.setting].append(part)
            bars[part.setting].update(len(part.indices))
        trace = trace_future.result() if trace_future is not None else None
    except BaseException:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for b in bars.values():
            b.close()
        if executor is not None:
            executor.shutdown(wait=True)
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)
    return {name: merge_results(p) for name, p in parts.items() if p}, trace


def _find_history(psi_dirs: Sequence[str]) -> str | None:
    """The run's ``history.jsonl`` next to the first artifact (``<run>/psi`` → ``<run>/history.jsonl``)."""
    if not psi_dirs:
        return None
    uri = psi_dirs[0].rstrip("/")
    run_dir = uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(uri)
    candidate = storage.join(run_dir, "history.jsonl")
    return candidate if storage.exists(candidate) else None


def _steps_per_task(cfg: Config, num_optimizers: Mapping[str, int]) -> int:
    """Training steps per task: L3RS and Adam (cosine) run every K; Adam (const) runs once to the largest K."""
    ks = cfg.evaluate.k_grid
    return num_optimizers.get("per_k", 0) * sum(ks) + num_optimizers.get("once", 0) * max(ks)


def run_evaluation(
    cfg: Config,
    psi_dirs: Sequence[str],
    *,
    out: str,
    tasks: int | None = None,
    settings: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    history: str | None = None,
    velo_og: str | None = None,
) -> dict[str, Any]:
    """Meta-evaluates ψ artifacts against Adam baselines and writes the report (``report.md``, ``report.csv``,
    ``report.json``, figures) to ``out``.

    Args:
      cfg: the validated config (``evaluate`` section: k_grid, adam_lrs, settings, other dataset/checkpoint).
      psi_dirs: ψ artifact folders (may be empty: then only ψ₀ of ``cfg.optimizer`` and the baselines).
      out: report folder (local path or URI).
      tasks: tasks per setting (default ``evaluate.tasks``).
      settings: subset of "ABCDE" (default ``evaluate.settings``). A setting whose other checkpoint is missing is
        skipped with a message; a missing in-domain checkpoint is an error.
      workers: processes (default ``evaluate.workers`` where the config has it, else ``os.cpu_count()``); 1 runs
        in this process. More start ``spawn`` processes
        (CPU, single-threaded XLA, a shared persistent compilation cache: ``JAX_COMPILATION_CACHE_DIR`` if set,
        else a temporary one), which re-import the caller's main module: call this under
        ``if __name__ == "__main__":`` in a script.
      progress: tqdm bars per setting.
      history: the run's ``history.jsonl`` (default: next to the first artifact, if there).
      velo_og: a downloaded VeLO checkpoint (learned_optimization ``hyper_v2`` format): adds the rows "VeLO (og)"
        and "VeLO (og, head)" (:func:`velo_og_artifacts`).

    Returns:
      The report dict (what ``report.json`` holds).
    """
    from l3rs import report as report_mod

    start = time.perf_counter()
    cfg = cfg.validate()
    num_tasks = int(tasks if tasks is not None else cfg.evaluate.tasks)
    if num_tasks < 1:
        raise ConfigError(f"evaluate.tasks: must be >= 1, got {num_tasks}.")
    if workers is None:  # an ``evaluate.workers`` config field (if the config has one; 0 = one per core)
        workers = getattr(cfg.evaluate, "workers", 0) or os.cpu_count() or 1
    workers = int(workers)
    psi_dirs = [_absolute(p) for p in psi_dirs]
    artifacts = load_artifacts(psi_dirs)
    if velo_og:
        artifacts += velo_og_artifacts(velo_og)
    optimizers = build_optimizers(cfg, artifacts)
    specs, skipped = _plan_settings(cfg, settings)
    for message in skipped.values():
        print(f"l3rs evaluate: {message}", file=sys.stderr)
    seeds = {s.name: eval_task_seeds(cfg, s.name, num_tasks) for s in specs}
    per_k = sum(1 for o in optimizers if not (o.is_adam and o.schedule == "constant"))
    once = len(optimizers) - per_k
    steps = _steps_per_task(cfg, {"per_k": per_k, "once": once})
    if progress:
        print(
            f"l3rs evaluate: {len(specs)} setting(s) x {num_tasks} task(s) x {len(optimizers)} optimizers, "
            f"K in {list(cfg.evaluate.k_grid)}: {steps} training steps per task, {workers} process(es).",
            file=sys.stderr,
        )
    # Fig. 4 (λ and μ per layer) exists for L3RS only: the first L3RS row (ψ₀ without artifacts), on setting A if
    # evaluated; none when every learned row is another family.
    trace_opt = next((o for o in optimizers if o.kind == "learned" and o.config.family == "l3rs"), None)
    run_start = time.perf_counter()
    if workers <= 1 or not specs:
        results, trace = _run_in_process(cfg, specs, optimizers, seeds, trace_opt, progress)
    else:
        results, trace = _run_pool(cfg, specs, optimizers, seeds, trace_opt, progress, workers)
    seconds = {
        "evaluation": round(time.perf_counter() - run_start, 3),
        "per_setting_process_seconds": {k: round(v.seconds, 3) for k, v in results.items()},
    }
    report = report_mod.build_report(
        cfg,
        artifacts=artifacts,
        optimizers=optimizers,
        specs=specs,
        results=results,
        skipped=skipped,
        trace=trace,
        history=history if history is not None else _find_history(psi_dirs),
        meta={
            "workers": workers,
            "tasks_per_setting": num_tasks,
            "steps_per_task": steps,
            "compiles": {k: v.compiles for k, v in results.items()},
            "seconds": seconds,
        },
    )
    report_mod.write_report(report, out, trace=trace, started=start)
    return report


def run_evaluation_cli(args: Any, cfg: Config) -> int:
    """``l3rs evaluate``: ``args.psi`` (artifact folders; default ``<run.storage>/<run.name>/psi``), ``args.tasks``,
    ``args.out`` (default ``<run.storage>/<run.name>/evaluation``); optional ``args.settings``, ``args.workers``."""
    from l3rs import report as report_mod

    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    psi_dirs = list(args.psi) if getattr(args, "psi", None) else [storage.join(run_dir, "psi")]
    for uri in psi_dirs:
        if not storage.exists(storage.join(uri, "metadata.json")):
            print(
                f"l3rs evaluate: no ψ artifact at {uri!r}; meta-train first (`l3rs train`) or pass --psi DIR.",
                file=sys.stderr,
            )
            return 2
    out = getattr(args, "out", None) or storage.join(run_dir, "evaluation")
    settings = getattr(args, "settings", None)
    if isinstance(settings, str):  # "AB", "A,B" or "A B"
        settings = [c for c in settings.upper() if c.isalpha()]
    try:
        report = run_evaluation(
            cfg,
            psi_dirs,
            out=out,
            tasks=getattr(args, "tasks", None),
            settings=settings,
            workers=getattr(args, "workers", None),
            velo_og=getattr(args, "velo_og", None),
        )
    except ValueError as e:  # bad artifacts / checkpoints: a clear message, not a traceback
        if isinstance(e, ConfigError):
            raise
        print(f"l3rs evaluate: {e}", file=sys.stderr)
        return 2
    print(report_mod.summary_text(report))
    print(f"report: {storage.join(out, 'report.md')}")
    return 0

"""The optimizers under test in a meta-evaluation: ψ artifacts of any learned-optimizer family, ψ₀ (the untrained start
of meta-training) and the Adam baselines (paper §5: Adam with a cosine schedule and with a constant learning rate over
``evaluate.adam_lrs``, each on the whole network and, if ``evaluate.head_only_baselines``, on the head only).

:func:`load_artifacts` reads and labels the artifacts, :func:`build_optimizers` turns them and the config into the
table's rows (:class:`OptimizerSpec`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from l3rs.config import Config

__all__ = [
    "Artifact",
    "OptimizerSpec",
    "format_lr",
    "artifact_label",
    "load_artifacts",
    "velo_og_artifacts",
    "model_params_shapes",
    "build_optimizers",
]


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


def model_params_shapes(cfg: Config) -> Any:
    """The shapes (``jax.ShapeDtypeStruct`` leaves) of ``model.name``'s params on ``data.dataset``'s images."""
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
    shapes = model_params_shapes(cfg)
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

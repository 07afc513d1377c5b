"""Which classes of which dataset each part of an evaluation setting saw: θ0's pretraining, ψ's meta-training and the
evaluation tasks (paper §5: the three are disjoint class sets).

A result on tasks whose classes meta-training already used measures less than one on new classes, so the report
says which it is, from the files themselves, never from fixed text:

- θ0: the checkpoint's ``meta.json`` (``dataset``, ``pretrain_classes``; :func:`l3rs.meta.pretrain.pretrain`);
- meta-training: each ψ artifact's metadata (``dataset``; ``meta_train_classes`` where it records them, else the
  dataset spec's :attr:`~l3rs.data.DatasetSpec.meta_train_classes`); for a task mixture, each of its
  ``task_sources`` (dataset, classes, N-way, weight, θ0: :mod:`l3rs.meta.mixture`);
- evaluation: the setting's dataset spec (``meta_test_classes``, ``train_split`` for the training batches,
  ``test_split`` for the eval batch), as :func:`l3rs.meta.settings.eval_distribution` draws them.

:func:`setting_classes` returns this as a JSON-ready dict; :func:`class_statement` says it in sentences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from l3rs import storage

__all__ = [
    "SHARED_NOTE",
    "format_classes",
    "relation",
    "theta0_classes",
    "meta_train_classes",
    "setting_classes",
    "classes_for_setting",
    "class_statement",
]

SHARED_NOTE = "shared classes: these tasks are not new classes"


def format_classes(classes: Sequence[int], dash: str = "–", limit: int = 12) -> str:
    """Class ids as ranges: ``[0, 1, 2, 3, 4]`` → ``"0–4"``, ``[1, 3, 4, 5]`` → ``"1, 3–5"``. More than ``limit``
    ranges are cut to the first ones and a count (``"…, 250 classes"``); the full list stays in ``report.json``."""
    ids = sorted({int(c) for c in classes})
    if not ids:
        return "none"
    ranges: list[str] = []
    start = prev = ids[0]
    for c in [*ids[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(str(start) if start == prev else f"{start}{dash}{prev}")
        if c is not None:
            start = prev = c
    if len(ranges) > limit:
        return ", ".join(ranges[:limit]) + f", … ({len(ids)} classes)"
    return ", ".join(ranges)


def relation(classes: Sequence[int], dataset: str | None, seen: Sequence[int] | None, seen_dataset: str | None) -> str:
    """How the class set ``classes`` of ``dataset`` relates to the ``seen`` classes of ``seen_dataset``:

    ``"other dataset"`` (different datasets), ``"disjoint"`` (no class in common), ``"shared"`` (the same classes),
    ``"overlap"`` (some in common), ``"subset"`` (all of ``classes`` were seen, among others) or ``"unknown"`` (a side
    does not say).
    """
    if dataset is None or seen_dataset is None or seen is None:
        return "unknown"
    if dataset != seen_dataset:
        return "other dataset"
    a, b = {int(c) for c in classes}, {int(c) for c in seen}
    if not a & b:
        return "disjoint"
    if a == b:
        return "shared"
    return "subset" if a <= b else "overlap"


def _preset(dataset: str) -> Any:
    """The preset :class:`l3rs.data.DatasetSpec` of ``dataset``, or None when this installation has no such preset."""
    from l3rs.data import get_spec

    try:
        return get_spec(dataset)
    except ValueError:
        return None


def _read_checkpoint_meta(uri: str) -> dict[str, Any] | None:
    from l3rs.meta.pretrain import META_FILE

    try:
        return json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
    except (OSError, ValueError):
        return None


def theta0_classes(checkpoint: str, name: str) -> dict[str, Any]:
    """θ0's pretraining data: ``{"checkpoint", "dataset", "classes", "split", "source"}``.

    ``checkpoint`` is the folder/URI to read (``"random"``: no pretraining), ``name`` how the report names it.
    """

    if checkpoint == "random":
        return {"checkpoint": "random", "dataset": None, "classes": [], "split": None,
                "source": "random initialisation: no pretraining"}  # fmt: skip
    meta = _read_checkpoint_meta(checkpoint) or {}
    dataset = meta.get("dataset")
    out: dict[str, Any] = {"checkpoint": name, "dataset": dataset, "classes": None, "split": None, "source": None}
    if dataset is None:
        out["source"] = "the checkpoint's meta.json does not name its dataset"
        return out
    spec = _preset(dataset)
    # The split the checkpoint recorded (a config may override the preset's, e.g. "train[:75%]"), else the preset's.
    out["split"] = meta.get("train_split") or (spec.train_split if spec is not None else None)
    if meta.get("pretrain_classes") is not None:
        out["classes"] = sorted(int(c) for c in meta["pretrain_classes"])
        out["source"] = "the checkpoint's meta.json"
    elif spec is not None:
        out["classes"] = sorted(int(c) for c in spec.pretrain_classes)
        out["source"] = f"the dataset spec of {dataset} (the checkpoint's meta.json lists no classes)"
    else:
        out["source"] = f"unknown: the checkpoint's meta.json lists no classes and {dataset} has no spec here"
    return out


def meta_train_classes(label: str, meta: dict[str, Any], *, name: str = "") -> dict[str, Any]:
    """ψ's meta-training data from an artifact's metadata: ``{"optimizer", "artifact", "dataset", "classes",
    "train_split", "eval_split", "num_ways", "source"}`` (``dataset`` None when the artifact does not record it,
    e.g. the published VeLO weights)."""

    dataset = meta.get("dataset")
    out: dict[str, Any] = {"optimizer": label, "artifact": name, "dataset": dataset, "classes": None,
                           "train_split": None, "eval_split": None, "num_ways": meta.get("num_classes"),
                           "source": None}  # fmt: skip
    if dataset is None:
        out["source"] = meta.get("source") or "the artifact's metadata does not name its meta-training dataset"
        return out
    spec = _preset(dataset)
    if spec is not None:
        out["train_split"], out["eval_split"] = spec.train_split, spec.valid_split
    splits = meta.get("splits")
    if isinstance(splits, dict) and splits.get("train"):  # recorded by the driver: the run's own splits
        out["train_split"], out["eval_split"] = splits["train"], splits.get("valid")
    recorded = meta.get("meta_train_classes")
    if recorded is None and isinstance(meta.get("classes"), dict):
        recorded = meta["classes"].get("meta_train")  # written by the driver since datasets take class splits
    if recorded is not None:
        out["classes"] = sorted(int(c) for c in recorded)
        out["source"] = "the artifact's metadata"
    elif spec is not None:
        out["classes"] = sorted(int(c) for c in spec.meta_train_classes)
        out["source"] = f"the artifact's metadata (dataset) and the dataset spec of {dataset} (meta_train_classes)"
    else:
        out["source"] = f"unknown: the artifact lists no classes and {dataset} has no spec here"
    if meta.get("task_sources"):  # a task mixture: the sources are what meta-training drew from, not [data] alone
        out["sources"] = [
            {
                "name": src.get("name"),
                "weight": src.get("weight"),
                "dataset": src.get("dataset"),
                "classes": (sorted(int(c) for c in src["meta_train_classes"])
                            if src.get("meta_train_classes") is not None else None),
                "num_ways": src.get("num_classes"),
                "theta0": src.get("model_checkpoint"),
            }
            for src in meta["task_sources"]
        ]  # fmt: skip
        out["source"] = "the artifact's metadata (task_sources)"
    return out


def _seen(m: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What a meta-training entry saw, as one ``{"dataset", "classes"}`` to relate ``dataset``'s tasks to: for a task
    mixture, the union of the classes of its sources on ``dataset`` (or its first source when none is on it)."""
    sources = m.get("sources")
    if not sources:
        return m
    same = [src for src in sources if src.get("dataset") == dataset]
    if not same:
        return {"dataset": sources[0].get("dataset"), "classes": sources[0].get("classes")}
    if any(src.get("classes") is None for src in same):
        return {"dataset": dataset, "classes": None}
    return {"dataset": dataset, "classes": sorted({int(c) for src in same for c in src["classes"]})}


def setting_classes(
    dataset: Any,
    num_ways: int,
    theta0: dict[str, Any],
    meta_train: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The class provenance of one setting: ``theta0`` (:func:`theta0_classes`), ``meta_train`` (one
    :func:`meta_train_classes` per meta-trained row), ``eval`` (the tasks: ``dataset``'s meta-test classes,
    ``num_ways``-way, splits) and ``relation`` of the evaluation classes to each (:func:`relation`)."""
    from l3rs.data import get_spec

    spec = get_spec(dataset)  # a name (its preset) or a resolved DatasetSpec
    dataset = spec.name
    evaluation = {
        "dataset": dataset,
        "classes": sorted(int(c) for c in spec.meta_test_classes),
        "num_ways": int(num_ways),
        "train_split": spec.train_split,
        "eval_split": spec.test_split,
        "source": f"the dataset spec of {dataset} (meta_test_classes)",
    }
    rel = {
        "theta0": relation(evaluation["classes"], dataset, theta0.get("classes"), theta0.get("dataset")),
        "meta_train": {
            m["optimizer"]: relation(evaluation["classes"], dataset, seen.get("classes"), seen.get("dataset"))
            for m in meta_train
            for seen in [_seen(m, dataset)]
        },
    }
    if theta0.get("checkpoint") == "random":
        rel["theta0"] = "random"
    out = {"theta0": dict(theta0), "meta_train": [dict(m) for m in meta_train], "eval": evaluation, "relation": rel}
    out["statement"] = class_statement(out)
    return out


def _classes_of(part: dict[str, Any]) -> str:
    if part.get("classes") is None:
        return f"unknown classes of {part.get('dataset')}"
    return f"{part['dataset']} classes {format_classes(part['classes'])}"


def _vs(rel: str, seen: dict[str, Any], eval_classes: Sequence[int], what: str) -> str:
    """How the evaluation classes relate to ``seen`` (θ0's pretraining or a row's meta-training), in words."""
    if rel == "other dataset":
        return f"none of them from {what}'s dataset ({seen['dataset']})"
    if rel == "disjoint":
        return f"disjoint from {what}'s classes: new classes"
    if rel == "shared":
        return f"{SHARED_NOTE} — they are exactly {what}'s classes"
    if rel in ("overlap", "subset"):
        common = sorted(set(seen["classes"]) & {int(c) for c in eval_classes})
        return f"partly shared with {what} (classes {format_classes(common)} in both): not all new classes"
    return f"unknown relation to {what}'s classes"


def class_statement(classes: dict[str, Any]) -> list[str]:
    """Sentences for the report: which classes of which dataset θ0 was pretrained on, which classes meta-training
    used (per meta-trained row), which classes and splits the evaluation tasks use, and whether the evaluation
    classes are new (saying ``"shared classes: these tasks are not new classes"`` when they equal meta-training's)."""
    ev, theta0 = classes["eval"], classes["theta0"]
    rel = classes["relation"]
    lines = []
    if rel["theta0"] == "random":
        lines.append("θ0: a random initialisation, not pretrained.")
    else:
        lines.append(f"θ0 ({theta0['checkpoint']}) was pretrained on {_classes_of(theta0)}"
                     + (f" ({theta0['split']} split)" if theta0.get("split") else "") + ".")  # fmt: skip
    for m in classes["meta_train"]:
        if m.get("dataset") is None:
            lines.append(f"{m['optimizer']} was meta-trained elsewhere ({m['source']}).")
            continue
        if m.get("sources"):
            parts = [
                f"{src['name']} (weight {src['weight']:g}): {_classes_of(src)}"
                + (f", {src['num_ways']}-way" if src.get("num_ways") else "")
                + (f", θ0 {src['theta0']}" if src.get("theta0") else "")
                for src in m["sources"]
            ]
            lines.append(f"{m['optimizer']} was meta-trained on a task mixture of {len(parts)} sources: "
                         + "; ".join(parts) + ".")  # fmt: skip
            continue
        lines.append(
            f"{m['optimizer']} was meta-trained on {_classes_of(m)}"
            + (f", {m['num_ways']}-way tasks" if m.get("num_ways") else "")
            + (f" (training batches from {m['train_split']}, eval batches from {m['eval_split']})"
               if m.get("train_split") else "") + "."
        )  # fmt: skip
    if not classes["meta_train"]:
        lines.append("No meta-trained optimizer is evaluated (ψ₀ is the untrained start of meta-training).")
    lines.append(
        f"Evaluation tasks: {ev['num_ways']}-way subsets of {_classes_of(ev)} (the meta-test classes), training "
        f"batches from the {ev['train_split']} split, the eval batch from the {ev['eval_split']} split."
    )
    notes = []
    if rel["theta0"] != "random":
        notes.append("vs θ0's pretraining: " + _vs(rel["theta0"], theta0, ev["classes"], "pretraining"))
    for m in classes["meta_train"]:
        r = rel["meta_train"][m["optimizer"]]
        text = _vs(r, _seen(m, ev["dataset"]), ev["classes"], "meta-training")
        if r == "shared" and m.get("train_split") == ev["train_split"]:
            text += (f"; their training batches come from the same {ev['train_split']} images meta-training drew "
                     f"from, only the eval batch ({ev['eval_split']} split) and the task draws are new")  # fmt: skip
        notes.append(f"vs {m['optimizer']}'s meta-training: {text}")
    if notes:
        lines.append("Evaluation classes " + "; ".join(notes) + ".")
    return lines


def classes_for_setting(
    spec: Any,
    num_ways: int,
    artifacts: Sequence[tuple[str, dict[str, Any], str]],
    *,
    root: str | None = None,
    dataset_spec: Any = None,
) -> dict[str, Any]:
    """:func:`setting_classes` of a :class:`l3rs.meta.settings.SettingSpec`: θ0 read from its checkpoint, one
    meta-training entry per ``(label, metadata, name)`` of the evaluated artifacts (``name``: how the report names
    the artifact). ``root`` (``run.storage``) names the artifacts' own θ0 (:func:`l3rs.names.display_uri`).
    ``dataset_spec``: the tasks' resolved :class:`l3rs.data.DatasetSpec` (a config's own class split); default: the
    preset of ``spec.dataset``."""
    from l3rs.names import display_uri

    theta0 = theta0_classes(spec.checkpoint, spec.checkpoint_name or spec.checkpoint)
    meta_train = []
    for label, meta, name in artifacts:
        entry = meta_train_classes(label, meta, name=name)
        if meta.get("model_checkpoint"):
            entry["theta0"] = display_uri(str(meta["model_checkpoint"]), root=root)
        meta_train.append(entry)
    return setting_classes(dataset_spec if dataset_spec is not None else spec.dataset, num_ways, theta0, meta_train)

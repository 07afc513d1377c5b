"""Resumable meta-evaluation: every finished task is kept, so a stopped ``l3rs evaluate`` goes on where it stopped,
and a new row beside old ones runs only the new row.

An evaluation is many independent (setting, task) jobs, and within a job each optimizer row's numbers depend only on
(config, setting, θ0, that row, the task seed) (:func:`l3rs.meta.eval_setting.evaluate_setting` is pure work). Each
finished job is written, atomically, to ``<out>/tasks/<setting>/<setting key>/task-<index>.json``, holding one entry
per optimizer row under the row's own key. ``<setting key>`` hashes what the tasks depend on: the config's [data],
[model], [task] and [evaluate] sections (without the fields that only say how many tasks run, where and which
settings: ``evaluate.tasks``, ``evaluate.workers``, ``evaluate.settings``, nor which rows: ``evaluate.adam_lrs``,
``evaluate.head_only_baselines``) and ``run.seed``, the setting (its name and dataset) and θ0's files (their bytes,
not their path: a moved run folder keeps its journal); a
row's key hashes its family and parameters (ψ), not its label. So, with the same ``--out``:

- a crashed or interrupted evaluation, run again, computes only the tasks it has not finished;
- ``--tasks 32`` after ``--tasks 16`` runs only tasks 16–31 (task ``i``'s seed does not depend on the count);
- another ``--psi`` beside the same baselines runs only that ψ's rows, and reads every Adam row back;
- any other change (a K grid, batch sizes, another checkpoint file) gives another setting key, and another ψ another
  row key, so stale numbers are never reused. Delete ``<out>/tasks`` to start over.

The numbers are stored as JSON floats (Python's ``repr`` round-trips float64 exactly; a non-finite loss is written as
``NaN``/``Infinity``): a resumed report holds exactly the numbers the first run computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from l3rs import storage
from l3rs.config import Config
from l3rs.meta.eval_optimizers import OptimizerSpec
from l3rs.meta.eval_setting import SettingResult
from l3rs.meta.settings import SettingSpec

__all__ = ["FOLDER", "Plan", "Stored", "TaskJournal", "setting_key", "row_key"]

FOLDER = "tasks"
FORMAT = "l3rs-evaluation-task/2"
# What a task's numbers depend on: the data, the model, the task shape and the evaluation protocol (and run.seed).
# Not: [run] names and storage, [nes], [workers], [pretrain]; [optimizer] only through the ψ₀ row's own key.
_SECTIONS_IN_KEY = ("data", "model", "task")
# [evaluate] fields that choose how many tasks run, where, which settings and which rows, not what a row computes.
_NOT_IN_KEY = ("tasks", "workers", "settings", "adam_lrs", "head_only_baselines")

Stored = dict[str, tuple[np.ndarray, np.ndarray]]  # row name -> (accuracy [K], loss [K])


class Plan(NamedTuple):
    """The work of an evaluation split by what its journal holds (:meth:`TaskJournal.plan`).

    ``done``: by setting, the tasks with every row stored, as one-task results. ``todo``: ``(setting, task index) ->
    (stored rows, missing rows)`` for the others, setting by setting in task order. ``rows_stored``: task × optimizer
    runs read back (those of ``done`` and those already in ``todo``'s tasks).
    """

    done: dict[str, list[SettingResult]]
    todo: dict[tuple[str, int], tuple[Stored, list[OptimizerSpec]]]
    rows_stored: int


def _add_files(uri: str, h: Any) -> None:
    """Adds the bytes of a checkpoint folder's files (θ0) to ``h``; nothing for "random" or a missing path."""
    if not uri or uri == "random" or not storage.exists(uri):
        return
    for name in storage.listdir(uri):  # a checkpoint folder is flat: meta.json, variables.msgpack
        h.update(name.encode())
        try:
            h.update(hashlib.sha256(storage.read_bytes(storage.join(uri, name))).digest())
        except OSError:  # a sub-folder: its name is enough
            continue


def _where(uri: str) -> str:
    """A checkpoint field as the key sees it: ``"random"`` or empty as they are; any path only as "a checkpoint",
    because :func:`_add_files` adds its contents."""
    return uri if uri in ("", "random") else "checkpoint"


def setting_key(cfg: Config, setting: SettingSpec) -> str:
    """The hash that names a setting's stored tasks: the config's [data], [model], [task], [evaluate] (minus the fields
    in ``_NOT_IN_KEY``) and ``run.seed``, the setting and θ0's files. Equal keys ⇔ the same tasks, data, model, θ0 and
    K grid."""
    full = cfg.to_dict()
    conf = {name: dict(full[name]) for name in _SECTIONS_IN_KEY}
    conf["evaluate"] = {k: v for k, v in full["evaluate"].items() if k not in _NOT_IN_KEY}
    conf["seed"] = full["run"]["seed"]  # with evaluate.seed, the task seeds
    # θ0 enters by its files' bytes, not where they lie: a run folder moved or copied elsewhere keeps its journal.
    conf["model"]["checkpoint"] = _where(conf["model"].get("checkpoint", ""))
    conf["evaluate"]["other_checkpoint"] = _where(conf["evaluate"].get("other_checkpoint", ""))
    spec = {"name": setting.name, "dataset": setting.dataset, "checkpoint": _where(setting.checkpoint)}
    h = hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode())
    h.update(json.dumps(spec, sort_keys=True).encode())
    _add_files(setting.checkpoint, h)
    return h.hexdigest()[:20]


def row_key(optimizer: OptimizerSpec) -> str:
    """The hash of what one optimizer row computes: its family (kind, schedule, scope, config) and parameters (not
    its label, which may change when other artifacts are evaluated beside it)."""
    h = hashlib.sha256(repr(optimizer.family()).encode())
    h.update(np.asarray(optimizer.params(), np.float32).tobytes())
    return h.hexdigest()[:20]


class TaskJournal:
    """The finished tasks of one evaluation folder (``out``): per setting and task, the numbers of each row."""

    def __init__(self, out: str, cfg: Config, specs: Sequence[SettingSpec], optimizers: Sequence[OptimizerSpec]):
        self.root = storage.join(out, FOLDER)
        self.k_grid = tuple(int(k) for k in cfg.evaluate.k_grid)
        self.optimizers = list(optimizers)
        self.rows = {o.name: row_key(o) for o in self.optimizers}
        self.keys = {s.name: setting_key(cfg, s) for s in specs}

    def _uri(self, setting: str, index: int) -> str:
        return storage.join(self.root, setting, self.keys[setting], f"task-{int(index)}.json")

    def _read(self, setting: str, index: int, seed: int) -> dict[str, Any]:
        """The task file's rows (by row key), or {} if there is none, or it is unreadable or of another task."""
        uri = self._uri(setting, index)
        if not storage.exists(uri):
            return {}
        try:
            d = json.loads(storage.read_bytes(uri))
            same = (d["format"], int(d["index"]), int(d["seed"]), tuple(d["k_grid"]))
            if same != (FORMAT, int(index), int(seed), self.k_grid) or not isinstance(d["rows"], dict):
                return {}
            return d["rows"]
        except (ValueError, KeyError, TypeError, OSError):
            return {}

    def load(self, setting: str, index: int, seed: int) -> Stored:
        """The stored numbers of task ``index`` (seed ``seed``) of ``setting`` for this evaluation's rows, by row name
        (only the rows that have run; a malformed entry counts as not run)."""
        found: Stored = {}
        rows = self._read(setting, index, seed)
        for name, key in self.rows.items():
            entry = rows.get(key)
            try:
                acc = np.asarray(entry["accuracy"], np.float64)
                loss = np.asarray(entry["loss"], np.float64)
            except (TypeError, KeyError, ValueError):
                continue
            if acc.shape == loss.shape == (len(self.k_grid),):
                found[name] = (acc, loss)
        return found

    def plan(self, specs: Sequence[SettingSpec], seeds: Mapping[str, Sequence[int]]) -> Plan:
        """Reads every task file of ``specs`` once and splits the tasks ``seeds[setting][index]`` into those with
        every row stored and those still to run (:class:`Plan`)."""
        done: dict[str, list[SettingResult]] = {s.name: [] for s in specs}
        todo: dict[tuple[str, int], tuple[Stored, list[OptimizerSpec]]] = {}
        rows = 0
        for s in specs:
            for i, seed in enumerate(seeds[s.name]):
                got = self.load(s.name, i, seed)
                rows += len(got)
                missing = self.missing(got)
                if missing:
                    todo[(s.name, i)] = (got, missing)
                else:
                    done[s.name].append(self.complete(s.name, i, seed, got, None))
        return Plan(done, todo, rows)

    def missing(self, got: Stored) -> list[OptimizerSpec]:
        """This evaluation's rows that ``got`` (one task's stored numbers) lacks, in order."""
        return [o for o in self.optimizers if o.name not in got]

    def complete(self, setting: str, index: int, seed: int, got: Stored, new: SettingResult | None) -> SettingResult:
        """One task's result with every row: the stored ones (``got``) and those just run (``new``, a one-task part
        of the missing rows, or None when nothing was missing)."""
        acc, loss = {}, {}
        for o in self.optimizers:
            if o.name in got:
                a, lo = got[o.name]
            else:
                assert new is not None, f"row {o.name!r} neither stored nor run"
                a, lo = new.accuracy[o.name][0], new.loss[o.name][0]
            acc[o.name], loss[o.name] = a[None, :], lo[None, :]
        return SettingResult(
            setting=setting,
            k_grid=self.k_grid,
            indices=np.asarray([index], np.int64),
            seeds=np.asarray([seed], np.uint64),
            accuracy=acc,
            loss=loss,
            compiles=new.compiles if new is not None else 0,
            seconds=new.seconds if new is not None else 0.0,
        )

    def save(self, part: SettingResult) -> None:
        """Stores the rows of each task of ``part`` beside the rows already in its file (atomically: a stopped run
        leaves the old file or the new one, never half of one)."""
        for row, (index, seed) in enumerate(zip(part.indices.tolist(), part.seeds.tolist(), strict=True)):
            rows = self._read(part.setting, index, seed)
            for name in part.accuracy:
                rows[self.rows[name]] = {
                    "name": name,
                    "accuracy": part.accuracy[name][row].tolist(),
                    "loss": part.loss[name][row].tolist(),
                }
            body = {"format": FORMAT, "setting": part.setting, "index": int(index), "seed": int(seed),
                    "k_grid": list(part.k_grid), "rows": rows}  # fmt: skip
            storage.write_bytes_atomic(self._uri(part.setting, index), json.dumps(body).encode())

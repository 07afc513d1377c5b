"""Resumable meta-evaluation: every finished task is kept, so a stopped ``l3rs evaluate`` goes on where it stopped.

An evaluation is many independent (setting, task) jobs (:func:`l3rs.meta.eval_setting.evaluate_setting` is pure work
over task seeds). Each finished job is written, atomically, to ``<out>/tasks/<setting>/<key>/task-<index>.json``;
a later run with the same inputs reads it back instead of running the task again. ``<key>`` is a hash of everything
a task's numbers depend on: the config (without the fields that only say how many tasks run and where:
``evaluate.tasks``, ``evaluate.workers``, ``evaluate.settings``), the setting (dataset, θ0), the optimizer rows and
their parameters. So:

- a crashed or interrupted evaluation, run again, computes only the tasks it has not finished;
- ``--tasks 32`` after ``--tasks 16`` runs only tasks 16–31 (task ``i``'s seed does not depend on the count);
- any other change (a K grid, a learning rate, another ψ, a new checkpoint file) gives another key, so stale
  numbers are never reused. Delete ``<out>/tasks`` to start over.

The stored numbers are float64 in JSON (Python's ``repr`` round-trips them exactly; a non-finite loss is written as
``NaN``/``Infinity``), so a resumed report is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.config import Config
from l3rs.meta.eval_optimizers import OptimizerSpec
from l3rs.meta.eval_setting import SettingResult
from l3rs.meta.settings import SettingSpec

__all__ = ["FOLDER", "TaskJournal", "journal_key"]

FOLDER = "tasks"
FORMAT = "l3rs-evaluation-task/1"
# Fields that choose how many tasks run, where and which settings, not what a task computes.
_NOT_IN_KEY = ("tasks", "workers", "settings")


def _file_digest(uri: str, h: Any) -> None:
    """Adds the bytes of a checkpoint folder's files (θ0) to ``h``; nothing for "random" or a missing path."""
    if not uri or uri == "random" or not storage.exists(uri):
        return
    for name in storage.listdir(uri):  # a checkpoint folder is flat: meta.json, variables.msgpack
        h.update(name.encode())
        try:
            h.update(hashlib.sha256(storage.read_bytes(storage.join(uri, name))).digest())
        except OSError:  # a sub-folder: its name is enough
            continue


def journal_key(cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> str:
    """The hash that names a setting's stored tasks: config (minus ``evaluate.tasks|workers|settings``), setting,
    θ0's files, optimizer rows and parameters. Equal keys ⇔ a task's numbers are the same computation."""
    conf = cfg.to_dict()
    conf["evaluate"] = {k: v for k, v in conf.get("evaluate", {}).items() if k not in _NOT_IN_KEY}
    h = hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode())
    h.update(json.dumps(dataclasses.asdict(setting), sort_keys=True, default=str).encode())
    _file_digest(setting.checkpoint, h)
    for o in optimizers:
        h.update(repr((o.name, o.family())).encode())
        h.update(np.asarray(o.params(), np.float32).tobytes())
    return h.hexdigest()[:20]


class TaskJournal:
    """The finished tasks of one evaluation folder (``out``), per setting, under the key of its inputs."""

    def __init__(self, out: str, cfg: Config, specs: Sequence[SettingSpec], optimizers: Sequence[OptimizerSpec]):
        self.root = storage.join(out, FOLDER)
        self.k_grid = tuple(int(k) for k in cfg.evaluate.k_grid)
        self.names = [o.name for o in optimizers]
        self.keys = {s.name: journal_key(cfg, s, optimizers) for s in specs}

    def _uri(self, setting: str, index: int) -> str:
        return storage.join(self.root, setting, self.keys[setting], f"task-{int(index)}.json")

    def load(self, setting: str, index: int, seed: int) -> SettingResult | None:
        """The stored result of task ``index`` (seed ``seed``) of ``setting``, or None if it has not run (or the
        file is unreadable or of other inputs: then the task runs again and the file is replaced)."""
        uri = self._uri(setting, index)
        if not storage.exists(uri):
            return None
        try:
            d = json.loads(storage.read_bytes(uri))
            if (d.get("format"), int(d["index"]), int(d["seed"]), tuple(d["k_grid"])) != (
                FORMAT,
                int(index),
                int(seed),
                self.k_grid,
            ) or sorted(d["accuracy"]) != sorted(self.names):
                return None
            return SettingResult(
                setting=setting,
                k_grid=self.k_grid,
                indices=np.asarray([index], np.int64),
                seeds=np.asarray([seed], np.uint64),
                accuracy={n: np.asarray([d["accuracy"][n]], np.float64) for n in self.names},
                loss={n: np.asarray([d["loss"][n]], np.float64) for n in self.names},
                compiles=0,
                seconds=float(d.get("seconds", 0.0)),
            )
        except (ValueError, KeyError, TypeError, OSError):
            return None

    def stored(
        self, specs: Sequence[SettingSpec], seeds: Mapping[str, Sequence[int]]
    ) -> dict[tuple[str, int], SettingResult]:
        """The results already stored, by (setting, task index), of the tasks ``seeds[setting][index]``."""
        found = {}
        for s in specs:
            for i, seed in enumerate(seeds[s.name]):
                part = self.load(s.name, i, seed)
                if part is not None:
                    found[(s.name, i)] = part
        return found

    def save(self, part: SettingResult) -> None:
        """Stores each task of ``part`` (atomically: a stopped run leaves whole files or none)."""
        for row, (index, seed) in enumerate(zip(part.indices.tolist(), part.seeds.tolist(), strict=True)):
            body = {
                "format": FORMAT,
                "setting": part.setting,
                "index": int(index),
                "seed": int(seed),
                "k_grid": list(part.k_grid),
                "accuracy": {n: part.accuracy[n][row].tolist() for n in self.names},
                "loss": {n: part.loss[n][row].tolist() for n in self.names},
                "seconds": round(part.seconds / max(len(part.indices), 1), 3),
            }
            storage.write_bytes_atomic(self._uri(part.setting, index), json.dumps(body).encode())

"""Pre-flight checks: refuse a run that is bound to fail before anything is written or computed.

``l3rs submit`` runs them on the client (as far as the client can see the run's files and the cluster), and the
driver runs them again on the cluster before it writes its run folder or starts a worker. Every failure raises
:class:`PreflightError` (a :class:`~l3rs.config.ConfigError`) whose message names the field and says what to do.

Checks:

- ``run.storage`` (and ``pretrain.output`` before pretraining): a known scheme and writable. A local folder is
  checked without creating it (a probe file in its nearest existing ancestor, removed at once); an object store gets
  a probe object that is deleted again.
- ``model.checkpoint`` holds a pretrained checkpoint (unless ``"random"``); so does every task source's
  ``task.sources[i].checkpoint`` of a task mixture, fitting the model on that source's images and N-way, and every
  source's model has the layers ψ is made for.
- resuming: a run of the same name that exists with a different config is refused, naming every differing field.
- ``workers.resources``: some node of the cluster (or a node type its autoscaler can add) can hold one worker.
- ``data.cache``: the dataset's class-indexed cache is complete, was prepared for this dataset, image size and class
  split, and every shard the workers will read (meta-training classes, train and valid splits) is there with the
  sha256 its manifest records. This is where checksums are verified before a run, once, by the driver (and the
  client): workers do not hash shards at start; the first worker on a node hashes the shards it copies into the
  node's shared file (:mod:`l3rs.data.cache`). The default local cache (``data.cache = ""``) is checked when it
  exists (it is made on first use).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from l3rs import storage
from l3rs.config import Config, ConfigError
from l3rs.optim.config import LEGACY_VALUES

__all__ = [
    "KNOWN_SCHEMES",
    "PreflightError",
    "check_checkpoint",
    "check_data",
    "check_location",
    "check_resources",
    "check_resume",
    "check_run",
    "cluster_capacity",
    "resume_differences",
]

# Sections whose change alters the math of a run: resuming with a different value is refused ...
RESUME_SECTIONS = ("data", "model", "task", "optimizer", "nes", "run")
# ... except these: where the run folder lives, how often it checkpoints and how many it keeps, how long it runs
# (extending a run), and where the data cache lives (any cache serving the run must match its dataset, image size and
# class split: check_data).
RESUME_MAY_CHANGE = {("run", "checkpoint_every"), ("run", "keep_checkpoints"), ("run", "storage"),
                     ("nes", "generations"), ("model", "module_path"), ("data", "cache")}  # fmt: skip
# pyarrow.fs schemes run storage accepts (local paths need none).
KNOWN_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")


class PreflightError(ConfigError):
    """A run that would fail: the message names the field and what to do. Nothing was written."""


def _scheme(uri: str) -> str | None:
    return uri.split("://", 1)[0].lower() if "://" in uri else None


def check_location(uri: str, field: str) -> None:
    """``uri`` can hold a folder we write into: a known scheme, and writable.

    Local paths: the path is a folder or does not exist yet, and its nearest existing ancestor is a folder where a
    file can be created (a probe file is created and removed at once; no folder is created). Object stores: a probe
    object is written, read back and deleted.

    Raises:
      PreflightError: naming ``field``.
    """
    scheme = _scheme(uri)
    if scheme is not None and scheme not in KNOWN_SCHEMES:
        raise PreflightError(
            f"{field}: unknown storage scheme {scheme + '://'!r} in {uri!r}; use a local path or one of "
            f"{', '.join(s + '://' for s in KNOWN_SCHEMES)}."
        )
    if scheme not in (None, "file"):
        try:
            storage.check_writable(uri)
        except (OSError, ValueError) as e:
            raise PreflightError(f"{field}: {e}") from None
        return
    path = os.path.abspath(os.path.expanduser(uri[len("file://") :] if scheme == "file" else uri))
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"{field}: {uri!r} is a file, not a folder.")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise PreflightError(f"{field}: cannot create {uri!r}: {probe!r} is a file, not a folder.")
    try:  # os.access says yes to root even on /proc: create (and at once remove) a file there instead
        fd, tmp = tempfile.mkstemp(prefix=".l3rs-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PreflightError(
            f"{field}: {uri!r} is not writable ({probe!r}: {e.strerror or e}); choose another location."
        ) from None


def check_checkpoint(cfg: Config) -> None:
    """``model.checkpoint`` is ``"random"`` or a θ0 that exists, is readable and fits the model; likewise each task
    source's θ0 (``task.sources[i].checkpoint``), and each source's model has the layer paths of ψ."""
    from l3rs.meta.runner import load_theta0

    if cfg.model.checkpoint != "random":
        try:  # exists, is a θ0 format we read, and fits the model's shapes
            load_theta0(cfg)
        except (OSError, ValueError) as e:
            raise PreflightError(str(e)) from None
    if not cfg.task.sources:
        return
    from l3rs.meta.mixture import task_sources
    from l3rs.meta.runner import model_shapes
    from l3rs.optim import layer_paths

    paths = layer_paths(model_shapes(cfg)["params"])
    for s in task_sources(cfg):
        field = f"task.sources[{s.index}].checkpoint"
        if layer_paths(model_shapes(s.config)["params"]) != paths:
            raise PreflightError(
                f"task.sources[{s.index}]: model {cfg.model.name!r} on this source's images has other layers than "
                "on [data]'s, so one ψ cannot serve both; use sources whose images the model maps to the same layers."
            )
        if s.config.model.checkpoint == "random":
            continue
        try:
            load_theta0(s.config, field=field)
        except (OSError, ValueError) as e:
            msg = str(e).removeprefix("model.checkpoint: ")  # read_theta0 names the plain run's field
            raise PreflightError(msg if msg.startswith(field) else f"{field}: {msg}") from None


def resume_differences(cfg: Config, run_dir: str) -> list[tuple[str, Any, Any]]:
    """``[(section.key, saved value, new value)]`` where ``cfg`` differs from the run already in ``run_dir``.

    Empty when there is no such run or nothing that matters changed (``RESUME_MAY_CHANGE`` may).
    """
    config_uri = storage.join(run_dir, "config.json")
    if not storage.exists(config_uri):
        return []
    saved = json.loads(storage.read_bytes(config_uri))
    current = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples become lists
    defaults = json.loads(json.dumps(Config().to_dict()))
    diffs = []
    for section in RESUME_SECTIONS:
        keys = sorted(set(current.get(section, {})) | set(saved.get(section, {})))
        for key in keys:
            if (section, key) in RESUME_MAY_CHANGE:
                continue
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if key not in saved.get(section, {}):
                if section == "optimizer" and key in LEGACY_VALUES:
                    old = LEGACY_VALUES[key]  # the run predates the field: it ran with the original behaviour
                elif new == defaults.get(section, {}).get(key):
                    continue  # a field newer than the saved run, at its default
            if old != new:
                diffs.append((f"{section}.{key}", old, new))
    return diffs


def check_resume(cfg: Config, run_dir: str) -> None:
    """Refuses to resume a run whose saved config differs in a field that changes its math."""
    diffs = resume_differences(cfg, run_dir)
    if diffs:
        listed = "; ".join(f"{name} was {old!r}, now {new!r}" for name, old, new in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise PreflightError(
            f"{diffs[0][0]}: run {cfg.run.name!r} already exists in {run_dir} with another config: {listed}{more}. "
            "Resuming would mix two experiments: use a new run.name (--run-name), or put the old values back."
        )


def _fits(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(float(node.get(k, 0.0)) + 1e-9 >= float(v) for k, v in need.items() if float(v) > 0)


def check_resources(
    need: dict[str, float],
    nodes: Iterable[dict[str, float]],
    *,
    node_types: Iterable[dict[str, float]] = (),
    autoscaling: bool = False,
) -> None:
    """Some node can ever hold one worker of shape ``need``.

    Args:
      need: ``workers.resources``.
      nodes: the total resources of every alive node.
      node_types: resources of the node types an autoscaler can add (empty: unknown or none).
      autoscaling: the cluster has an autoscaler whose node types are unknown here: accept (the pool waits for
        ``workers.placement_timeout_s``).
    """
    nodes, node_types = list(nodes), list(node_types)
    if any(_fits(n, need) for n in nodes + node_types) or (autoscaling and not node_types):
        return
    have = sorted({k for n in nodes for k in n if not k.startswith("node:") and k not in ("object_store_memory",)})
    biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    raise PreflightError(
        f"workers.resources: no node of this cluster can ever hold one worker with {need} (largest node: "
        f"{biggest}; resources it knows: {have}) and no autoscaler can add one. Ask for what the nodes have, e.g. "
        "workers.resources = { CPU = 1 }, or add a node that has it."
    )


def cluster_capacity() -> tuple[list[dict[str, float]], list[dict[str, float]], bool]:
    """From the connected Ray driver: ``(alive nodes' resources, autoscaler node types' resources, autoscaling)``."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    node_types: list[dict[str, float]] = []
    autoscaling = False
    try:  # autoscaler v2 (and KubeRay) publish the node groups they can launch
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None:
            for group in config.node_group_configs:
                if group.max_count != 0:
                    node_types.append({k: float(v) for k, v in group.resources.items()})
            autoscaling = True
    except Exception:
        pass
    if not autoscaling:
        try:  # autoscaler v1 writes its status to the GCS; read-only (no autoscaling config) names types node_<id>
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get

            from l3rs.service.jobclient import autoscaler_can_add_nodes

            raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            if raw is not None:
                report = json.loads(raw).get("autoscaler_report") or {}
                autoscaling = autoscaler_can_add_nodes(report.get("node_type_mapping") or {})
        except Exception:
            pass
    return nodes, node_types, autoscaling


def check_data(cfg: Config, uses: Iterable[tuple[str, str]] = (("meta_train", "train_split"),
                                                                  ("meta_train", "valid_split"))) -> None:  # fmt: skip
    """``data.cache`` can serve ``uses`` (pairs of class split and split field; default: what meta-training workers
    read): complete, prepared for this config (else the differing field is named), every needed shard present (else
    its URI is named) with its recorded sha256 (else "corrupt", naming the URI)."""
    from l3rs.data import cache

    spec = cfg.data.spec()
    uri = cache.cache_uri(spec, cfg.data.data_dir or None)
    if spec.cache:
        scheme = _scheme(spec.cache)
        if scheme is not None and scheme not in KNOWN_SCHEMES:
            raise PreflightError(f"data.cache: unknown storage scheme {scheme + '://'!r} in {spec.cache!r}; use a "
                                 f"local path or one of {', '.join(s + '://' for s in KNOWN_SCHEMES)}.")  # fmt: skip
    elif not storage.exists(storage.join(uri, cache.MANIFEST)):
        return  # the default local cache is prepared on first use
    try:
        cache.verify(spec, uri, shards=cache.needed_shards(spec, uses))
    except (cache.CacheError, OSError) as e:
        raise PreflightError(str(e)) from None


def check_run(cfg: Config, run_dir: str) -> None:
    """The file checks of a meta-training run: ``run.storage``, ``model.checkpoint``, resume compatibility and the
    data cache."""
    check_location(cfg.run.storage, "run.storage")
    check_checkpoint(cfg)
    check_resume(cfg, run_dir)
    check_data(cfg)

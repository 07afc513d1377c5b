"""The Python API of the command line: pretrain θ0, meta-train ψ, meta-evaluate, from a notebook or a pipeline.

``l3rs pretrain``, ``l3rs train`` and ``l3rs evaluate`` call these same functions.

    import l3rs
    cfg = l3rs.Config.from_toml("examples/your_domain/your_domain.toml").replace({"nes.generations": 5})
    l3rs.pretrain(cfg)                                   # θ0 (or point model.checkpoint at your own)
    run = l3rs.train(cfg)                                # run.run_dir, run.psi_uri, run.history
    res = l3rs.evaluate(cfg, psi=run.psi_uri, tasks=20)  # res.rows, res.summary, res.out
    tx = l3rs.load(run.psi_uri, total_steps=100, params=params)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from l3rs import storage
from l3rs.config import Config, ConfigError, config_from_dict, load_config

__all__ = [
    "EvaluationResult",
    "TrainingStopped",
    "as_config",
    "evaluate",
    "pretrain",
    "train",
]  # + TrainResult, PretrainResult (lazy)


def as_config(config: Config | str | os.PathLike | Mapping[str, Any] | None) -> Config:
    """A validated :class:`Config` from a Config, a TOML path, a nested dict, or None (the embedded default).

    Raises:
      ConfigError: naming the bad field (before any work starts).
    """
    if config is None:
        return Config().validate()
    if isinstance(config, Config):
        return config.validate()
    if isinstance(config, str | os.PathLike):
        return load_config(Path(config))
    if isinstance(config, Mapping):
        return config_from_dict(dict(config))
    raise ConfigError(f"config: expected a Config, a TOML path or a dict, got {type(config).__name__}.")


def pretrain(config: Config | str | os.PathLike | Mapping[str, Any] | None = None, *, progress: bool = True) -> Any:
    """Pretrains θ0 on the dataset's pretrain classes (``[pretrain]``: steps, batch size, learning rate, seed; with
    ``num_classes`` > 0 only the first that many) and writes it to ``pretrain.output``; the model and dataset are
    ``[model]`` and ``[data]``.

    Returns:
      :class:`l3rs.meta.pretrain.PretrainResult`: ``variables`` and ``meta`` (test accuracy, classes, timing).
    """
    from l3rs.meta.pretrain import pretrain as _pretrain
    from l3rs.service.driver import resolve_paths
    from l3rs.service.preflight import check_location

    cfg = resolve_paths(as_config(config))
    p, m = cfg.pretrain, cfg.model
    check_location(p.output, "pretrain.output")  # writable before the work, not found out after it
    return _pretrain(dataset=cfg.data.spec(), model_name=m.name, steps=p.steps, batch_size=p.batch_size,
                     learning_rate=p.learning_rate, seed=p.seed, data_dir=cfg.data.data_dir or None, output=p.output,
                     progress=progress, model_options=dict(m.options), module_path=m.module_path,
                     num_classes=p.num_classes)  # fmt: skip


CONNECT_TIMEOUT_S = 5.0  # how long train() waits for a cluster address to answer before giving up


class TrainingStopped(Exception):
    """:func:`train` was stopped by SIGINT or SIGTERM (with ``stop_on_signals=True``); the run resumes when the same
    call is made again.

    Attributes:
      signum: the signal.
      generation: generations completed when it stopped.
      checkpoint_generation: the generation of the last checkpoint (0: none yet).
    """

    def __init__(self, signum: int, generation: int, checkpoint_generation: int) -> None:
        self.signum, self.generation, self.checkpoint_generation = signum, generation, checkpoint_generation
        c = checkpoint_generation
        where = (
            f"the last checkpoint is generation {c}; rerun the same command to resume"
            if c
            else "there is no checkpoint yet; rerun the same command to start again"
        )
        super().__init__(f"stopped at generation {generation}; {where}")


class _Signalled(BaseException):
    """Raised in the main thread by the first SIGINT / SIGTERM (a BaseException, like Ctrl-C's)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def train(
    config: Config | str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    address: str | None = None,
    dashboard: bool = False,
    progress: bool = True,
    stop_on_signals: bool = False,
) -> Any:
    """Meta-trains ψ with NES on Ray (or resumes the run ``run.name`` from its last checkpoint).

    Args:
      config: the run config (Config, TOML path, dict; None = the embedded default).
      address: the GCS address ``HOST:PORT`` of a Ray cluster to join; default ``RAY_ADDRESS``, else this process's
        Ray if initialised, else a new local cluster on 127.0.0.1 (sized by ``workers``).
      dashboard: start the dashboard with a new local cluster.
      progress: a progress bar when attached to a terminal (one log line per generation always).
      stop_on_signals: SIGINT and SIGTERM stop the run cleanly (the pool is shut down, the last checkpoint kept) and
        raise :class:`TrainingStopped`; later signals are ignored while it cleans up. Installed after joining Ray,
        whose C++ failure handler would otherwise print a crash dump on SIGTERM. Main thread only.

    Returns:
      :class:`l3rs.service.driver.TrainResult`: ``run_dir``, ``psi_uri`` (the ψ artifact for :func:`l3rs.load`),
      ``generations``, ``history`` (one dict per generation) and ``psi_sha256``.

    Raises:
      ConfigError: a bad config or address, unwritable storage, or a θ0 that does not fit the model: before Ray
        starts.
      l3rs.service.jobclient.ClusterUnreachable: nothing answers at ``address`` (within ``CONNECT_TIMEOUT_S``).
      TrainingStopped: with ``stop_on_signals``, after SIGINT / SIGTERM.
    """
    from l3rs.service.driver import Driver
    from l3rs.service.preflight import check_checkpoint

    cfg = as_config(config)
    driver = Driver(cfg, progress=progress)  # validates paths before Ray starts
    if driver.cfg.model.checkpoint != "random":  # θ0 exists, is readable and fits the model: before Ray starts
        check_checkpoint(driver.cfg)
    _connect(address, cfg, dashboard=dashboard)
    if not stop_on_signals:
        return driver.run()
    import signal

    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise _Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return driver.run()
    except BaseException:
        # The handler's _Signalled may surface wrapped: raised inside a C extension's call (Ray's Cython
        # `CoreWorker.wait`, where the driver blocks during a generation), it comes back as "SystemError: ...
        # returned a result with an exception set". Whatever it became, a received signal is a clean stop.
        if received:
            raise TrainingStopped(received[0], driver.generation, driver.checkpoint_generation) from None
        raise
    finally:
        if not received:  # after a signal the handlers stay, so a second Ctrl-C cannot interrupt the clean-up
            for sig, h in previous.items():
                signal.signal(sig, h)


def _check_port(address: str) -> None:
    """Fails within seconds when nothing listens at a ``HOST:PORT`` Ray address, instead of Ray's long retries."""
    import socket

    from l3rs.service.jobclient import ClusterUnreachable

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address: expected the cluster's HOST:PORT (e.g. 127.0.0.1:6379), got {address!r}.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterUnreachable(
            f"cannot reach a Ray cluster at {address} ({e}): start it (cluster/start_local.sh) or pass its GCS "
            "address HOST:6379."
        ) from None


def _connect(address: str | None, cfg: Config, dashboard: bool = False) -> None:
    """Joins the cluster at ``address``, else ``RAY_ADDRESS``, else reuses this process's Ray, else starts a local
    one on 127.0.0.1."""
    import ray

    from l3rs.service.jobclient import ClusterUnreachable
    from l3rs.service.raycluster import connect, init_local

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise ConfigError(
                f"address: {address!r} is a dashboard URL; training joins the cluster itself: give its GCS "
                "address HOST:6379 (the dashboard URL is for `l3rs submit`)."
            )
        _check_port(address)
        try:
            connect(address)
        except (ConnectionError, TimeoutError) as e:
            raise ClusterUnreachable(f"cannot join the Ray cluster at {address}: {e}") from None
    elif not ray.is_initialized():  # a notebook's own Ray is reused
        cpus = max(int(cfg.workers.max_workers * cfg.workers.resources.get("CPU", 1)), 1)
        init_local(num_cpus=cpus, include_dashboard=dashboard)


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` returns.

    Attributes:
      out: the report folder (``report.md``, ``report.csv``, ``report.json``, figures).
      report: the report dict (what ``report.json`` holds).
    """

    out: str
    report: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The report tables as rows (one per setting, optimizer and K; the columns of ``report.csv``)."""
        return [row for setting in self.report["settings"].values() for row in setting["rows"]]

    @property
    def summary(self) -> str:
        """The text ``l3rs evaluate`` prints: the in-domain (or first) table and the speedup over best Adam."""
        from l3rs.report import summary_text

        return summary_text(self.report)

    def accuracy(self, setting: str | None = None) -> dict[str, dict[int, float | None]]:
        """Mean accuracy per optimizer and K of ``setting`` (default: the first evaluated)."""
        settings = self.report["settings"]
        name = setting or next(iter(settings))
        if name not in settings:
            raise KeyError(f"setting {name!r} was not evaluated; evaluated: {sorted(settings)}.")
        out: dict[str, dict[int, float | None]] = {}
        for row in settings[name]["rows"]:
            out.setdefault(row["optimizer"], {})[int(row["K"])] = row["mean_acc"]
        return out


def evaluate(
    config: Config | str | os.PathLike | Mapping[str, Any] | None = None,
    psi: str | Sequence[str] | None = None,
    *,
    out: str | None = None,
    tasks: int | None = None,
    settings: str | Sequence[str] | None = None,
    workers: int | None = None,
    velo_og: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Meta-tests ψ artifacts against Adam baselines on held-out tasks (settings A–E, ``[evaluate]``).

    Args:
      config: the run config.
      psi: artifact folder(s); default ``<run.storage>/<run.name>/psi``. ``[]`` evaluates ψ₀ and the baselines only.
      out: report folder; default ``<run.storage>/<run.name>/evaluation``.
      tasks, workers: override ``evaluate.tasks`` / ``evaluate.workers`` (1 = this process).
      settings: a subset of "ABCDE", e.g. ``"A"`` or ``["A", "C"]``.
      velo_og: a downloaded VeLO checkpoint (adds VeLO (og) rows).

    Raises:
      ConfigError: a bad config or checkpoint. ValueError: no ψ artifact at ``psi``, or one that does not fit.
    """
    from l3rs.meta.evaluate import run_evaluation

    cfg = as_config(config)
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    psi_dirs = [psi] if isinstance(psi, str) else list(psi) if psi is not None else [storage.join(run_dir, "psi")]
    for uri in psi_dirs:
        if not storage.exists(storage.join(uri, "metadata.json")):
            raise ValueError(f"psi: no ψ artifact at {uri!r}; meta-train first (`l3rs train`) or pass psi=DIR.")
    if isinstance(settings, str):  # "AB", "A,B" or "A B"
        settings = [c for c in settings.upper() if c.isalpha()]
    out = out or storage.join(run_dir, "evaluation")
    report = run_evaluation(cfg, psi_dirs, out=out, tasks=tasks, settings=settings, workers=workers,
                            progress=progress, velo_og=velo_og)  # fmt: skip
    return EvaluationResult(out=out, report=report)


def __getattr__(name: str) -> Any:  # the result types live with the code that makes them
    if name == "TrainResult":
        from l3rs.service.driver import TrainResult

        return TrainResult
    if name == "PretrainResult":
        from l3rs.meta.pretrain import PretrainResult

        return PretrainResult
    raise AttributeError(name)

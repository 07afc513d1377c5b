"""The ``l3rs`` command line.

pretrain, train (the Ray job entrypoint), evaluate, demo, data prepare / verify (the dataset's class-indexed cache), and
for clusters submit / status / logs / stop / fetch.

Exit codes: 0 success; 1 the job or run failed; 2 bad input (config, arguments, a pre-flight check, an unknown job
or run); 3 the cluster cannot be reached; 130 / 143 ``train`` stopped by SIGINT (Ctrl-C) / SIGTERM (``l3rs stop``),
resumable by rerunning the same command. Errors are one line on stderr; ``--verbose`` adds the traceback.

``--address``: for ``train`` the Ray cluster (GCS) address, ``HOST:6379`` (default: ``RAY_ADDRESS``, else a new
local cluster); for ``submit / status / logs / stop / fetch`` the dashboard URL, ``http://HEAD:8265`` (default:
``L3RS_DASHBOARD``, then ``RAY_API_SERVER_ADDRESS``). The flag always wins over the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tomllib
from typing import Any

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_SIGINT", "EXIT_SIGTERM", "EXIT_UNREACHABLE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1  # the job or run failed
EXIT_BAD_INPUT = 2  # config, arguments, pre-flight checks, unknown job or run
EXIT_UNREACHABLE = 3  # no cluster / dashboard answers at the address
EXIT_SIGINT = 128 + signal.SIGINT  # 130: train stopped by Ctrl-C; rerun to resume
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: train stopped by SIGTERM (also `l3rs stop`); rerun to resume


class CLIError(Exception):
    """A failure the user can act on: printed as one line, the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` (value parsed as TOML, falling back to a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CLIError(f"--set: expected section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        section, key = path.split(".", 1)
        out.setdefault(section, {})[key] = toml_value(raw)
    return out


def toml_value(raw: str) -> Any:
    """A command-line value parsed as TOML (``10``, ``"x"``, ``[1, 2]``, ``false``), falling back to the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _load(args) -> Any:
    from l3rs.config import config_from_dict

    # No --config: the embedded default (the Config defaults, also written out in jobs/configs/fmnist_default.toml).
    raw: dict[str, Any] = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise CLIError(f"config: no such file {args.config!r}")
        with open(args.config, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise CLIError(f"config: {args.config} is not valid TOML: {e}") from None
    for section, values in _parse_overrides(getattr(args, "set", None)).items():
        raw.setdefault(section, {}).update(values)
    if getattr(args, "run_name", None):
        raw.setdefault("run", {})["name"] = args.run_name
    return config_from_dict(raw)


def _dashboard(args) -> str:
    from l3rs.service.jobclient import dashboard_address

    try:
        return dashboard_address(getattr(args, "address", None))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _job(args, address: str) -> tuple[Any, Any]:
    """(client, job info) of ``args.job`` at the dashboard ``address``."""
    from l3rs.service.jobclient import job_client, job_info

    client = job_client(address)
    return client, job_info(client, args.job, address)


def _failure_summary(message: str | None) -> str:
    """One line from a failed job's message: Ray's first sentence and the last line of the logs it quotes."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    head = lines[0].split(", last available logs")[0]
    return head if len(lines) == 1 else f"{head}: {lines[-1]}"


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from l3rs.api import pretrain
    from l3rs.service.driver import resolve_paths

    cfg = resolve_paths(_load(args))
    p = cfg.pretrain
    result = pretrain(cfg)  # checks that pretrain.output is writable before the work
    print(json.dumps({k: result.meta[k] for k in ("model", "dataset", "test_accuracy", "steps", "seconds")}))
    print(f"checkpoint: {p.output}")
    return 0


def cmd_train(args) -> int:
    from l3rs.api import TrainingStopped, train

    cfg = _load(args)
    try:
        result = train(cfg, address=args.address, dashboard=args.dashboard, stop_on_signals=True)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr, flush=True)
        return EXIT_SIGINT if stopped.signum == signal.SIGINT else EXIT_SIGTERM
    print(
        json.dumps(
            {
                "run_dir": result.run_dir,
                "psi": result.psi_uri,
                "generations": result.generations,
                "psi_sha256": result.psi_sha256,
            }
        )
    )
    return 0


def _preflight_submit(cfg, address: str, local_head: bool) -> None:
    """What the client can check before it submits (the driver checks everything again on the cluster)."""
    from l3rs import storage
    from l3rs.service import preflight
    from l3rs.service.driver import run_dir_for
    from l3rs.service.jobclient import cluster_nodes

    if local_head:  # the head sees our files: every check
        preflight.check_run(cfg, run_dir_for(cfg))
    else:  # a remote head: only what lives in shared object stores; local paths are the head's
        if not storage.is_local(cfg.run.storage):
            preflight.check_location(cfg.run.storage, "run.storage")
            preflight.check_resume(cfg, run_dir_for(cfg))
        if cfg.model.checkpoint != "random" and not storage.is_local(cfg.model.checkpoint):
            preflight.check_checkpoint(cfg)
        if cfg.data.cache and not storage.is_local(cfg.data.cache):
            preflight.check_data(cfg)
    nodes, autoscaling = cluster_nodes(address)
    if nodes:
        preflight.check_resources(dict(cfg.workers.resources), nodes, autoscaling=autoscaling)


def cmd_submit(args) -> int:
    import shlex

    from l3rs.service.driver import resolve_paths
    from l3rs.service.jobclient import head_shares_filesystem, job_client, probe_dashboard

    cfg = _load(args)
    config_rel = os.path.relpath(os.path.abspath(args.config), os.getcwd())
    if config_rel.startswith(".."):
        raise CLIError("the config must be inside the current directory (it is uploaded as working_dir).")
    if cfg.model.module_path and os.path.relpath(os.path.abspath(cfg.model.module_path), os.getcwd()).startswith(".."):
        # The job and its workers import the user's model from the uploaded working_dir (their cwd).
        raise CLIError("model.module_path must be inside the current directory (uploaded as working_dir).")
    address = _dashboard(args)
    info = probe_dashboard(address)
    # The head sees this machine's files only if it runs here: decided by its session folder, not by 127.0.0.1
    # (tunnels to remote heads are 127.0.0.1 too). --remote-paths forces "remote".
    local_head = head_shares_filesystem(info) and not args.remote_paths
    sets = list(args.set or [])
    if local_head:
        # Make relative paths absolute so the job (which runs in an unpacked copy of the working dir) writes where
        # the user will look.
        cfg = resolve_paths(cfg)
        sets += [f"run.storage={json.dumps(cfg.run.storage)}", f"model.checkpoint={json.dumps(cfg.model.checkpoint)}"]
        if cfg.data.cache:
            sets.append(f"data.cache={json.dumps(cfg.data.cache)}")
    _preflight_submit(cfg, address, local_head)
    # A head on this machine runs the job with this interpreter (its PATH may lack the venv: `python: not found`).
    python = sys.executable if local_head else "python"
    entry = [python, "-m", "l3rs.cli", "train", "--config", config_rel] + sum((["--set", s] for s in sets), [])
    if args.run_name:
        entry += ["--run-name", args.run_name]
    runtime_env: dict[str, Any] = {
        "working_dir": ".",
        "excludes": ["runs/", ".git/", "venv/", ".venv/", "*.msgpack", "__pycache__/", "reports/"],
    }
    if args.pip:
        runtime_env["pip"] = args.pip
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entry),
        runtime_env=runtime_env,
        metadata={"l3rs_run": cfg.run.name, "l3rs_storage": cfg.run.storage},
    )
    print(f"job: {job_id}")
    print(f"dashboard: {address}/#/jobs/{job_id}")
    print(f"logs: l3rs logs {job_id} --address {address}   fetch: l3rs fetch {job_id} --to DIR --address {address}")
    return 0


def cmd_status(args) -> int:
    _, info = _job(args, _dashboard(args))
    status = str(getattr(info.status, "value", info.status))
    print(
        json.dumps(
            {"job": args.job, "status": status, "message": info.message, "metadata": info.metadata},
            default=str,
        )
    )
    return EXIT_FAILED if status == "FAILED" else EXIT_OK


def cmd_logs(args) -> int:
    client, _ = _job(args, _dashboard(args))
    if args.follow:
        import asyncio

        async def tail() -> None:
            async for lines in client.tail_job_logs(args.job):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    else:
        print(client.get_job_logs(args.job), end="")
    return 0


def cmd_stop(args) -> int:
    client, info = _job(args, _dashboard(args))
    status = str(getattr(info.status, "value", info.status))
    if status in ("SUCCEEDED", "FAILED", "STOPPED"):
        print(f"job {args.job} already ended: {status}")
        return 0
    client.stop_job(args.job)
    print(
        f"stop requested for job {args.job}: its driver stops within seconds and keeps its checkpoints; "
        "submit the same config again to resume."
    )
    return 0


def cmd_fetch(args) -> int:
    from l3rs import storage
    from l3rs.artifact import ArtifactExistsError, copy_artifact

    run = args.run
    storage_uri = args.storage
    job_status = None
    if run.startswith("raysubmit_") or args.address:
        address = _dashboard(args)
        args.job = run
        _, info = _job(args, address)
        meta = info.metadata or {}
        if "l3rs_run" not in meta:
            raise CLIError(f"job {run} was not submitted by `l3rs submit` (no l3rs_run metadata).")
        job_status = str(getattr(info.status, "value", info.status))
        if job_status == "FAILED":
            raise CLIError(
                f"job {run} FAILED ({_failure_summary(info.message)}); nothing fetched. See `l3rs logs {run}`.",
                EXIT_FAILED,
            )
        run, storage_uri = meta["l3rs_run"], storage_uri or meta["l3rs_storage"]
    storage_uri = storage_uri or "runs"
    run_dir = storage.join(storage_uri, run)
    src = storage.join(run_dir, "psi")
    if not storage.exists(storage.join(src, "metadata.json")):
        if not storage.exists(run_dir):
            runs = [r for r in storage.listdir(storage_uri) if not r.startswith(".")]
            shown = ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "") if runs else "none"
            raise CLIError(f"no run {run!r} in {storage_uri!r} (runs there: {shown}); use --storage.")
        when = f"job is {job_status}; " if job_status else ""
        raise CLIError(f"run {run!r} has no ψ artifact yet ({when}it writes one at every checkpoint).", EXIT_FAILED)
    if job_status in ("PENDING", "RUNNING", "STOPPED"):
        print(f"note: job is {job_status}: this is ψ as of its last checkpoint", file=sys.stderr)
    try:
        meta = copy_artifact(src, args.to, force=args.force)
    except ArtifactExistsError as e:
        raise CLIError(f"{e}") from None
    except ValueError as e:  # corrupt or unreadable artifact
        raise CLIError(f"{e}", EXIT_FAILED) from None
    print(
        json.dumps(
            {
                "artifact": args.to,
                "sha256": meta["sha256"],
                "run": meta.get("run_name"),
                "generations": meta.get("generations"),
                "k_range": meta.get("k_range"),
            }
        )
    )
    return 0


def cmd_data_prepare(args) -> int:
    """Writes the config's class-indexed cache (l3rs.data.cache): with Ray tasks when a cluster is given
    (``--address`` or ``RAY_ADDRESS``, as inside a Ray job), else in this process."""
    import time

    from l3rs import storage
    from l3rs.data import cache

    cfg = _load(args)
    spec = cfg.data.spec()
    data_dir = cfg.data.data_dir or None
    if data_dir and storage.is_local(data_dir) and not data_dir.startswith("file://"):
        data_dir = os.path.abspath(os.path.expanduser(data_dir))  # Ray tasks run in other folders
    uri = cache.cache_uri(spec, data_dir)
    if storage.is_local(uri) and not uri.startswith("file://"):
        uri = os.path.abspath(os.path.expanduser(uri))
    if not storage.is_local(uri):
        from l3rs.service.preflight import check_location

        check_location(uri, "data.cache")
    address = args.address or os.environ.get("RAY_ADDRESS")
    map_fn = None
    if address and not args.local:
        import ray

        from l3rs.service.dataprep import ray_map
        from l3rs.service.raycluster import connect

        if not ray.is_initialized():
            connect(address)
        map_fn = ray_map(pin_here=storage.is_local(uri))
    bar: dict[str, Any] = {}

    def progress(step: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            if step not in bar:
                bar[step] = tqdm(total=total, desc=f"data prepare: {step}", unit="task")
            bar[step].update(done - bar[step].n)
            if done == total:
                bar[step].close()
        elif done == total or done % max(1, total // 10) == 0:
            print(f"data prepare: {step} {done}/{total}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    result = cache.prepare(spec, uri, data_dir=data_dir, map_fn=map_fn, progress=progress,
                           chunk_records=args.chunk_records)  # fmt: skip
    m = result["manifest"]
    print(json.dumps({"cache": uri, "dataset": m["dataset"], "image_shape": m["image_shape"],
                      "shards": result["shards"], "written": result["written"], "skipped": result["skipped"],
                      "bytes": result["bytes"], "already_complete": result["already_complete"],
                      "ray": map_fn is not None, "seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip
    return 0


def cmd_data_verify(args) -> int:
    """Checks the config's cache: complete, for this config, every shard's sha256 (what pre-flight does for a run)."""
    from l3rs.data import cache

    cfg = _load(args)
    spec = cfg.data.spec()
    print(json.dumps(cache.verify(spec, cache.cache_uri(spec, cfg.data.data_dir or None))))
    return 0


def cmd_evaluate(args) -> int:
    from l3rs.meta.evaluate import run_evaluation_cli

    return run_evaluation_cli(args, _load(args))


def cmd_demo(args) -> int:
    from l3rs.demo import run_demo

    return run_demo(args, _load(args))


# ----------------------------------------------------------------------------------------------------------------
DASHBOARD_HELP = (
    "the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (HOST:PORT means http://HOST:PORT); default: "
    "L3RS_DASHBOARD, then RAY_API_SERVER_ADDRESS. The flag wins over the environment (RAY_ADDRESS is not used)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l3rs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add_sub(*a: Any, **kw: Any) -> argparse.ArgumentParser:  # --verbose also after the command
        p = add_parser(*a, **kw)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    sub.add_parser = add_sub  # type: ignore[method-assign]

    def with_config(p: argparse.ArgumentParser, required: bool = False) -> argparse.ArgumentParser:
        p.add_argument("--config", required=required, help="TOML run config (default: the embedded default)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
        p.add_argument("--run-name", help="override run.name")
        return p

    p = with_config(sub.add_parser("pretrain", help="train θ0 on the pretrain classes"))
    p.set_defaults(func=cmd_pretrain)

    p = with_config(sub.add_parser("train", help="meta-train ψ with NES on Ray (the job entrypoint)"))
    p.add_argument(
        "--address",
        help="the Ray cluster's GCS address HOST:6379 (or ray://HOST:10001); default: RAY_ADDRESS, else a new "
        "local loopback cluster. The flag wins over RAY_ADDRESS.",
    )
    p.add_argument("--dashboard", action="store_true", help="start the dashboard with the local cluster")
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("evaluate", help="meta-test ψ artifacts against Adam baselines"))
    p.add_argument("--psi", action="append", help="ψ artifact folder(s); default: the run's psi/")
    p.add_argument("--tasks", type=int, default=None, help="tasks per setting")
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--settings", default=None, help='subset of settings, e.g. "AB" or "A,C"')
    p.add_argument(
        "--velo-og", default=None, metavar="FILE", help="a downloaded VeLO checkpoint (hyper_v2): adds VeLO (og) rows"
    )
    p.set_defaults(func=cmd_evaluate)

    p = with_config(sub.add_parser("demo", help="the whole story on the embedded default data"))
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke version (numbers not meaningful)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="the dataset's class-indexed cache: prepare once, verify")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = with_config(data_sub.add_parser("prepare", help="decode the config's dataset into its cache (data.cache)"))
    p.add_argument(
        "--address",
        help="a Ray cluster's GCS address (default: RAY_ADDRESS, set inside a Ray job): run the work as Ray tasks "
        "there; without either, run in this process",
    )
    p.add_argument("--local", action="store_true", help="run in this process even when RAY_ADDRESS is set")
    p.add_argument(
        "--chunk-records", type=int, default=10_000, help="records decoded per task (default 10000)", metavar="N"
    )
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_data_prepare)
    p = with_config(data_sub.add_parser("verify", help="check the cache's manifest, class split and checksums"))
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_data_verify)

    p = with_config(sub.add_parser("submit", help="submit `l3rs train` as a Ray job"), required=True)
    p.add_argument("--address", help=DASHBOARD_HELP)
    p.add_argument("--pip", action="append", help="extra pip requirements for the job's runtime_env")
    p.add_argument(
        "--remote-paths",
        action="store_true",
        help="keep relative paths relative (they are the head's). Normally detected: a head is local when its Ray "
        "session folder is on this machine, whatever its address (tunnels to remote heads are 127.0.0.1 too)",
    )
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in (
        ("status", cmd_status, "job status"),
        ("logs", cmd_logs, "job logs"),
        ("stop", cmd_stop, "stop a job"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job", help="the job id `l3rs submit` printed (raysubmit_...)")
        p.add_argument("--address", help=DASHBOARD_HELP)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("fetch", help="copy a run's ψ artifact out and verify its checksum")
    p.add_argument("run", help="run name, or a job id (with --address)")
    p.add_argument("--to", required=True, help="destination folder (path or URI): new or empty, unless --force")
    p.add_argument(
        "--force",
        action="store_true",
        help="the destination holds other files: replace only the artifact's (psi.msgpack, metadata.json) there",
    )
    p.add_argument("--storage", help="the run's storage (default: runs)")
    p.add_argument("--address", help=DASHBOARD_HELP + " To resolve a job id.")
    p.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (see the module docstring). Never raises, except SystemExit."""
    from l3rs.service.jobclient import adopt_token_auth

    args = build_parser().parse_args(argv)  # bad arguments: argparse's usage line, exit 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    adopt_token_auth()  # a token file counts even without RAY_AUTH_MODE=token
    try:
        return args.func(args)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        code, message = _describe_failure(e, args.command)
        if code is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"l3rs {command}: {message}", file=sys.stderr, flush=True)
        return code


def _describe_failure(e: BaseException, command: str) -> tuple[int | None, str]:
    """(exit code, one-line message) of a failure; (None, "") for SystemExit, which passes through."""
    from l3rs.config import ConfigError
    from l3rs.data.cache import CacheError
    from l3rs.service.jobclient import ClusterUnreachable, JobNotFound

    if isinstance(e, SystemExit):
        return None, ""
    if isinstance(e, CLIError):
        return e.code, str(e)
    if isinstance(e, ConfigError):  # pre-flight checks too
        return EXIT_BAD_INPUT, f"config error: {e}"
    if isinstance(e, CacheError):  # a data cache that cannot serve the config (names the field or the shard)
        return EXIT_BAD_INPUT, str(e)
    if isinstance(e, JobNotFound):
        return EXIT_BAD_INPUT, str(e)
    if isinstance(e, ClusterUnreachable):
        return EXIT_UNREACHABLE, str(e)
    if isinstance(e, KeyboardInterrupt) or isinstance(e.__cause__, KeyboardInterrupt):
        # (a Ctrl-C inside a C extension's call, e.g. Ray's Cython wait, comes back as SystemError from it)
        return EXIT_SIGINT, "interrupted"
    first = (str(e).strip().splitlines() or [""])[0]
    return EXIT_FAILED, f"failed: {type(e).__name__}: {first} (--verbose shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())

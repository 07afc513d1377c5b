"""The ``l3rs`` command line.

pretrain, train (the Ray job entrypoint), evaluate, demo, and for clusters submit / status / logs / stop / fetch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from typing import Any

__all__ = ["main"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` (value parsed as TOML, falling back to a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"--set: expected section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        section, key = path.split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def _load(args) -> Any:
    from l3rs.config import config_from_dict

    # No --config: the embedded default (the Config defaults, also written out in jobs/configs/fmnist_default.toml).
    raw: dict[str, Any] = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise SystemExit(f"config: no such file {args.config!r}")
        with open(args.config, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise SystemExit(f"config: {args.config} is not valid TOML: {e}") from None
    for section, values in _parse_overrides(getattr(args, "set", None)).items():
        raw.setdefault(section, {}).update(values)
    if getattr(args, "run_name", None):
        raw.setdefault("run", {})["name"] = args.run_name
    return config_from_dict(raw)


def _connect(address: str | None, cfg=None, dashboard: bool = False) -> None:
    from l3rs.service.raycluster import connect, init_local

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        connect(address)
    else:
        cpus = None
        if cfg is not None:
            cpus = max(int(cfg.workers.max_workers * cfg.workers.resources.get("CPU", 1)), 1)
        init_local(num_cpus=cpus, include_dashboard=dashboard)


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from l3rs.api import pretrain
    from l3rs.service.driver import resolve_paths

    cfg = resolve_paths(_load(args))
    p = cfg.pretrain
    result = pretrain(cfg)
    print(json.dumps({k: result.meta[k] for k in ("model", "dataset", "test_accuracy", "steps", "seconds")}))
    print(f"checkpoint: {p.output}")
    return 0


def cmd_train(args) -> int:
    from l3rs.api import train

    result = train(_load(args), address=args.address, dashboard=args.dashboard)
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


def cmd_submit(args) -> int:
    from ray.job_submission import JobSubmissionClient

    from l3rs.service.driver import resolve_paths

    cfg = _load(args)
    sets = list(args.set or [])
    # A head on this machine (not one reached through a tunnel: --remote-paths) shares this filesystem.
    local_head = any(h in args.address for h in ("127.0.0.1", "localhost")) and not args.remote_paths
    if local_head:
        # A local head shares this filesystem: make relative paths absolute so the job (which runs in an unpacked
        # copy of the working dir) writes where the user will look.
        resolved = resolve_paths(cfg)
        sets += [
            f"run.storage={json.dumps(resolved.run.storage)}",
            f"model.checkpoint={json.dumps(resolved.model.checkpoint)}",
        ]
    config_rel = os.path.relpath(os.path.abspath(args.config), os.getcwd())
    if config_rel.startswith(".."):
        raise SystemExit("submit: the config must be inside the current directory (it is uploaded as working_dir).")
    if cfg.model.module_path and os.path.relpath(os.path.abspath(cfg.model.module_path), os.getcwd()).startswith(".."):
        # The job and its workers import the user's model from the uploaded working_dir (their cwd).
        raise SystemExit("submit: model.module_path must be inside the current directory (uploaded as working_dir).")
    entry = ["python", "-m", "l3rs.cli", "train", "--config", config_rel] + sum((["--set", s] for s in sets), [])
    if args.run_name:
        entry += ["--run-name", args.run_name]
    import shlex

    runtime_env: dict[str, Any] = {
        "working_dir": ".",
        "excludes": ["runs/", ".git/", "venv/", ".venv/", "*.msgpack", "__pycache__/", "reports/"],
    }
    if args.pip:
        runtime_env["pip"] = args.pip
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entry),
        runtime_env=runtime_env,
        metadata={
            "l3rs_run": cfg.run.name,
            "l3rs_storage": cfg.run.storage if not local_head else resolve_paths(cfg).run.storage,
        },
    )
    print(f"job: {job_id}")
    print(f"dashboard: {args.address.rstrip('/')}/#/jobs/{job_id}")
    print(
        f"logs: l3rs logs {job_id} --address {args.address}   "
        f"fetch: l3rs fetch {job_id} --to DIR --address {args.address}"
    )
    return 0


def cmd_status(args) -> int:
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(args.address).get_job_info(args.job)
    print(
        json.dumps(
            {"job": args.job, "status": str(info.status), "message": info.message, "metadata": info.metadata},
            default=str,
        )
    )
    return 0


def cmd_logs(args) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
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
    from ray.job_submission import JobSubmissionClient

    stopped = JobSubmissionClient(args.address).stop_job(args.job)
    print(f"stop requested: {stopped}")
    return 0


def cmd_fetch(args) -> int:
    from l3rs import storage
    from l3rs.artifact import verify_artifact

    run = args.run
    storage_uri = args.storage
    if run.startswith("raysubmit_") or args.address:
        if not args.address:
            raise SystemExit("fetch: a job id needs --address http://HEAD:8265")
        from ray.job_submission import JobSubmissionClient

        meta = JobSubmissionClient(args.address).get_job_info(run).metadata or {}
        if "l3rs_run" not in meta:
            raise SystemExit(f"fetch: job {run} was not submitted by `l3rs submit` (no l3rs_run metadata).")
        run, storage_uri = meta["l3rs_run"], storage_uri or meta["l3rs_storage"]
    src = storage.join(storage_uri or "runs", run, "psi")
    verify_artifact(src)
    storage.copy_tree(src, args.to)
    meta = verify_artifact(args.to)
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


def cmd_evaluate(args) -> int:
    from l3rs.meta.evaluate import run_evaluation_cli

    return run_evaluation_cli(args, _load(args))


def cmd_demo(args) -> int:
    from l3rs.demo import run_demo

    return run_demo(args, _load(args))


# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l3rs", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool = False) -> argparse.ArgumentParser:
        p.add_argument("--config", required=required, help="TOML run config (default: the embedded default)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
        p.add_argument("--run-name", help="override run.name")
        return p

    p = with_config(sub.add_parser("pretrain", help="train θ0 on the pretrain classes"))
    p.set_defaults(func=cmd_pretrain)

    p = with_config(sub.add_parser("train", help="meta-train ψ with NES on Ray (the job entrypoint)"))
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local loopback cluster)")
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

    p = with_config(sub.add_parser("submit", help="submit `l3rs train` as a Ray job"), required=True)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--pip", action="append", help="extra pip requirements for the job's runtime_env")
    p.add_argument(
        "--remote-paths",
        action="store_true",
        help="keep relative paths relative (a remote head reached through a tunnel such as kubectl port-forward)",
    )
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in (
        ("status", cmd_status, "job status"),
        ("logs", cmd_logs, "job logs"),
        ("stop", cmd_stop, "stop a job"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job")
        p.add_argument("--address", required=True)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("fetch", help="copy a run's ψ artifact out and verify its checksum")
    p.add_argument("run", help="run name, or a job id (with --address)")
    p.add_argument("--to", required=True, help="destination folder (path or URI)")
    p.add_argument("--storage", help="the run's storage (default: runs)")
    p.add_argument("--address", help="Ray dashboard address (to resolve a job id)")
    p.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    from l3rs.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"l3rs: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

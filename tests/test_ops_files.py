"""The operations files: autoscaler and KubeRay YAML, job configs, shell scripts, Dockerfiles and their docs.

Fast and Ray-free (no cluster is started; the scripts' guard rails are run up to the point where they would start
one). The local cluster itself is exercised by the integration tests of l3rs.service.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from l3rs.cli import build_parser
from l3rs.config import load_config
from l3rs.optim import VARIANTS

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"
CONFIGS = sorted((REPO / "jobs" / "configs").rglob("*.toml"))
ABLATIONS = sorted((REPO / "jobs" / "configs" / "ablations").glob("*.toml"))
AUTOSCALER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SCRIPTS = sorted(p for d in ("cluster", "jobs", "docker") for p in (REPO / d).rglob("*.sh"))
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
IMAGE_WORKDIR = "/home/ray/l3rs"  # the images' working directory: where `--config jobs/configs/...` resolves


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_expected_ops_files_exist():
    # Guards the parametrized tests below against silently testing nothing.
    expected = [
        "cluster/start_local.sh",
        "cluster/stop_local.sh",
        "cluster/add_local_worker.sh",
        "cluster/aws-gpu.yaml",
        "cluster/gcp-gpu.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/README.md",
        "docker/Dockerfile.cpu",
        "docker/Dockerfile.cuda",
        "docker/README.md",
        "jobs/submit_example.sh",
        "jobs/configs/fmnist_default.toml",
        "jobs/configs/imagenet_resnet34.toml",
        "jobs/configs/ablations/baseline.toml",
    ]
    assert [p for p in expected if not (REPO / p).is_file()] == []
    assert len(AUTOSCALER_YAMLS) >= 2 and len(KUBERAY_YAMLS) >= 2 and len(DOCKERFILES) == 2 and len(SCRIPTS) >= 5


# ------------------------------------------------------------------------------------------------ versions
def _docker_arg(path: Path, name: str) -> str:
    values = set(re.findall(rf"^ARG {name}=(\S+)$", path.read_text(), flags=re.M))
    assert len(values) == 1, f"{_rel(path)}: expected one default for ARG {name}, got {values}"
    return values.pop()


def _ray_version() -> str:
    """The Ray version the images pin; every node and client of a cluster must run the same one."""
    versions = {_docker_arg(p, "RAY_VERSION") for p in DOCKERFILES}
    assert len(versions) == 1, f"the Dockerfiles pin different Ray versions: {versions}"
    return versions.pop()


# ------------------------------------------------------------------------------------------------ autoscaler
@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=_rel)
def test_autoscaler_yaml(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "docker"):
        assert key in cfg, f"{_rel(path)}: missing {key}"
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    assert head in types
    assert "GPU" not in types[head].get("resources", {}), "the head runs the driver only"
    gpu_types = {n: t for n, t in types.items() if n != head and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, f"{_rel(path)}: no worker node type with resources.GPU >= 1"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
        assert t["max_workers"] >= 1 and t["resources"].get("CPU", 0) >= 1, name
    # Ray's own checks: its JSON schema (which rejects unknown keys), filled-in defaults and cross-field rules.
    validate_config(prepare_config(copy.deepcopy(cfg)))
    # Token auth on every node (the token file is shipped to them), the dashboard on the head's loopback only.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "cuda" in cfg["docker"]["image"], "GPU nodes run the image from docker/Dockerfile.cuda"


def test_gcp_scheduling_is_a_mapping():
    # The Compute Engine API takes `scheduling` as an object; Ray's own example files get this wrong (a list).
    gcp = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    for name, t in gcp["available_node_types"].items():
        scheduling = t["node_config"].get("scheduling", {})
        assert isinstance(scheduling, dict), name
        if t["node_config"].get("guestAccelerators"):
            assert scheduling.get("onHostMaintenance") == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"


# ------------------------------------------------------------------------------------------------ KubeRay
def _check_ray_cluster_spec(where: str, spec: dict, ray_version: str) -> None:
    assert spec["rayVersion"] == ray_version, f"{where}: rayVersion must be the images' Ray ({ray_version})"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"]["mode"] == "token", f"{where}: keep Ray's token auth on"
    assert isinstance(spec.get("autoscalerOptions"), dict), where
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        params = group["rayStartParams"]
        assert isinstance(params, dict), f"{where}/{name}: rayStartParams must be a mapping"
        assert all(isinstance(v, str) for v in params.values()), f"{where}/{name}: rayStartParams values are strings"
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), f"{where}/{name}"
        assert containers[0]["workingDir"] == IMAGE_WORKDIR, f"{where}/{name}"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: the head runs the driver only"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1, where
        assert g["minReplicas"] == 0, f"{where}: GPU pods should scale to zero when idle"


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=_rel)
def test_kuberay_manifest(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    ray_version = _ray_version()
    for doc in docs:
        where = f"{_rel(path)}:{doc.get('kind')}"
        assert doc["apiVersion"] == "ray.io/v1", where
        assert doc["kind"] in ("RayCluster", "RayJob"), where
        name = doc["metadata"]["name"]
        # KubeRay derives Service names (<name>-head-svc) from it: a DNS-1035 label with room for the suffix.
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 50, where
        if doc["kind"] == "RayCluster":
            _check_ray_cluster_spec(where, doc["spec"], ray_version)
        else:
            spec = doc["spec"]
            _check_ray_cluster_spec(where, spec["rayClusterSpec"], ray_version)
            assert spec["shutdownAfterJobFinishes"] is True, where
            entry = shlex.split(spec["entrypoint"])
            assert entry[:4] == ["l3rs", "train", "--config", entry[3]] and entry[3].startswith("jobs/configs/")
            build_parser().parse_args(entry[1:])
            load_config(REPO / entry[3])


# ------------------------------------------------------------------------------------------------ job configs
@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_job_config_loads(path):
    cfg = load_config(path)
    assert cfg.run.name


def test_run_names_are_distinct():
    names = [load_config(p).run.name for p in CONFIGS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_ablation_set_covers_paper_section_6():
    configs = {p.stem: load_config(p) for p in ABLATIONS}
    base = configs["baseline"].to_dict()
    for stem, cfg in configs.items():
        # Named after the file; otherwise the baseline's run: same data, θ0, K = 10, NES schedule, workers, evaluation.
        assert cfg.run.name == "ablation-" + stem.replace("_", "-")
        d, b = cfg.to_dict(), copy.deepcopy(base)
        for x in (d, b):
            x.pop("optimizer")
            x["run"].pop("name")
        assert d == b, f"{stem} differs from baseline.toml outside [optimizer] and run.name"
        # Paper §6: K = 10, 500 generations, meta-lr and σ decay every 100 generations.
        assert (cfg.task.k_min, cfg.task.k_max, cfg.nes.generations, cfg.nes.decay_every) == (10, 10, 500, 100)
    got = {
        (frozenset(c.optimizer.direction_names), c.optimizer.variant, tuple(sorted(c.optimizer.ema_decays)))
        for c in configs.values()
    }
    paper_ema = (0.0, 0.9, 0.99)
    # Table 2 (with the v2 revision's "Global"): base optimizers x per-layer strategy.
    for dirs in ({"sgd"}, {"adam"}, {"adam", "sgd"}):
        for variant in VARIANTS:
            assert (frozenset(dirs), variant, paper_ema) in got, (dirs, variant)
    # Table 3: EMA smoothing factors.
    for ema in (paper_ema, (0.0, 0.9), (0.0,), ()):
        assert (frozenset({"adam", "sgd"}), "embedding", ema) in got, ema
    # Table 4: base-optimizer sets.
    for dirs in (
        {"sgd", "adam"},
        {"adam", "lion", "lamb"},
        {"adamax", "sgd", "lamb"},
        {"sgd", "adam", "adamax", "lion", "lamb", "weight_decay"},
    ):
        assert (frozenset(dirs), "embedding", paper_ema) in got, dirs


# ------------------------------------------------------------------------------------------------ shell scripts
@pytest.mark.parametrize("path", SCRIPTS, ids=_rel)
def test_shell_script_syntax_and_mode(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    if path.name.startswith("_"):  # a library the scripts source, not a command
        assert not text.startswith("#!") and not os.access(path, os.X_OK)
        assert any(f'source "$here/{path.name}"' in s.read_text() for s in SCRIPTS if s.parent == path.parent)
    else:
        assert text.startswith("#!/usr/bin/env bash\n") and os.access(path, os.X_OK), _rel(path)
        assert "\nset -euo pipefail\n" in text, _rel(path)


def _run_script(name: str, *args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "RAY_BIN": str(Path(sys.executable).parent / "ray"),
        "L3RS_CLUSTER_DIR": str(tmp_path / "cluster"),
    }
    return subprocess.run([str(CLUSTER / name), *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_start_local_help_and_bad_option(tmp_path):
    shown = _run_script("start_local.sh", "--help", tmp_path=tmp_path)
    assert shown.returncode == 0 and "--host" in shown.stdout and "127.0.0.1" in shown.stdout
    bad = _run_script("start_local.sh", "--no-such-option", tmp_path=tmp_path)
    assert bad.returncode == 2 and "usage" in bad.stderr
    assert not (tmp_path / "cluster").exists()


def test_start_local_refuses_unauthenticated_lan_address(tmp_path):
    # Binding beyond loopback is an explicit opt-in, and never without token auth. Nothing starts.
    result = _run_script("start_local.sh", "--host", "192.0.2.10", tmp_path=tmp_path, RAY_AUTH_MODE="disabled")
    assert result.returncode != 0 and "refusing" in result.stderr
    assert not (tmp_path / "cluster").exists()


def test_start_local_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = _run_script("start_local.sh", "--port", port, tmp_path=tmp_path)
    assert result.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert not (tmp_path / "cluster" / "head.pid").exists()


def test_stop_and_add_worker_without_a_cluster(tmp_path):
    stopped = _run_script("stop_local.sh", tmp_path=tmp_path)
    assert stopped.returncode == 0 and "no local cluster" in stopped.stdout
    bad = _run_script("stop_local.sh", "--worker", "x", tmp_path=tmp_path)
    assert bad.returncode == 2
    added = _run_script("add_local_worker.sh", tmp_path=tmp_path)
    assert added.returncode == 1 and "start one first" in added.stderr


# ------------------------------------------------------------------------------------------------ Dockerfiles
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # a comment inside a continuation
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{_rel(path)}: dangling line continuation"
    return out


def _dockerignore(path: Path) -> list[str]:
    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.exists():
        return []
    return [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=_rel)
def test_dockerfile(path):
    instructions = _instructions(path)
    assert [i for i, _ in instructions if i not in ("ARG",)][0] == "FROM", "FROM first (after ARGs)"
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE"}
    assert {i for i, _ in instructions} <= known, {i for i, _ in instructions} - known
    ignored = _dockerignore(path)
    sources = []
    for instr, args in instructions:
        if instr not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        srcs = [t for t in tokens if not t.startswith("--")][:-1]
        assert srcs, f"{_rel(path)}: {instr} {args}"
        for src in srcs:
            assert (REPO / src).exists(), f"{_rel(path)}: {instr} source {src!r} does not exist in the repository"
            excluded = [pat for pat in ignored if fnmatch.fnmatch(src.rstrip("/"), pat)]
            assert not excluded, f"{_rel(path)}: {src!r} is excluded from the build context by {excluded}"
        sources += srcs
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", pyproject["readme"], "l3rs", "jobs"} <= set(sources)
    assert ("WORKDIR", IMAGE_WORKDIR) in instructions
    assert _docker_arg(path, "RAY_VERSION") == _ray_version()
    text = " ".join(args for _, args in instructions)
    if path.name.endswith(".cpu"):
        assert instructions[0][1].startswith("python:3.11-slim")
        assert "dataset-fashion-mnist" in text and "ray[default]==${RAY_VERSION}" in text
    else:
        assert "jax[cuda12]" in text and "rayproject/ray:${RAY_VERSION}" in text


# ------------------------------------------------------------------------------------------------ docs
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _readme_cluster_section() -> str:
    """The top-level README's section about clusters (its heading mentions "cluster"), if it has one."""
    section, level, fenced = [], 0, False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#{1,6}) ", line)
        if heading and level and len(heading.group(1)) <= level:
            break  # the next section
        if heading and not level and "cluster" in line.lower():
            level = len(heading.group(1))
        if level:
            section.append(line)
    return "\n".join(section)


def _doc_texts() -> dict[str, str]:
    files = [*CLUSTER.rglob("*"), *DOCKER.glob("*"), *SCRIPTS, *CONFIGS]
    texts = {_rel(p): p.read_text() for p in sorted(set(files)) if p.is_file() and p.suffix != ".pyc"}
    texts["README.md (cluster section)"] = _readme_cluster_section()
    return texts


# `l3rs` in command position: start of a (comment-stripped) line, or after a backtick, `"`, `$(`, `&&`, `||`, `;`, `|`.
_COMMAND = re.compile(r"(?:^|(?<=[`\"])|(?<=\$\()|(?<=&& )|(?<=\|\| )|(?<=; )|(?<=\| ))l3rs(?=\s)")


def _tokens(text: str) -> list[str]:
    """Shell words of ``text`` up to the first operator (``&&``, ``|``, ``)``, ``;``, ...)."""
    for attempt in (text, text.rstrip().rstrip("\"'")):
        lexer = shlex.shlex(attempt, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        argv = []
        try:
            for token in lexer:
                if token and set(token) <= set("();<>|&"):
                    break
                argv.append(token)
        except ValueError:  # unbalanced quote, e.g. the end of `bash -c "... && l3rs train ..."`
            continue
        return [a for a in argv if a != "$@"]
    return []


def _documented_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every `l3rs ...` in a file's code, comments and code spans: (``"span"`` or ``"line"``, argv without ``l3rs``).

    ``"span"``: inside a backtick code span, where prose may quote part of a command (`l3rs submit --address`).
    """
    commands = []
    for line in re.sub(r"\\\n\s*#?\s*", " ", text).splitlines():
        line = re.sub(r"^\s*(?:#+|-|\$)?\s*", "", line)
        for match in _COMMAND.finditer(line):
            kind = "span" if match.start() and line[match.start() - 1] == "`" else "line"
            rest = line[match.end() :].split("`", 1)[0] if kind == "span" else line[match.end() :]
            rest = re.split(r"\s#", rest, maxsplit=1)[0]  # a trailing comment
            commands.append((kind, _tokens(rest)))
    return commands


def _check_command(kind: str, argv: list[str], subcommands: dict[str, argparse.ArgumentParser]) -> str | None:
    """What is wrong with `l3rs ARGV` as documented, or None."""
    if not argv or argv[0].startswith("-"):
        return None  # `l3rs --help`, `l3rs -v ...`
    options = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    if argv[0] not in subcommands:
        # Prose that starts with the package's name ("l3rs meta-training on AWS ...") is not a command.
        return "no such command (l3rs --help)" if kind == "span" or options else None
    if kind == "span":  # possibly partial: every option it names must exist (in the innermost subcommand named)
        parser, rest = subcommands[argv[0]], argv[1:]
        while rest and not rest[0].startswith("-"):
            nested = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not nested or rest[0] not in nested[0]:
                break
            parser, rest = nested[0][rest[0]], rest[1:]
        known = {o for action in parser._actions for o in action.option_strings}
        unknown = sorted(set(options) - known)
        return f"unknown option(s) {unknown}" if unknown else None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return "does not parse" if e.code else None
    return None


def test_documented_l3rs_commands_exist_and_parse():
    subcommands = _subcommands()
    bad, seen = [], 0
    for where, text in _doc_texts().items():
        for kind, argv in _documented_commands(text):
            seen += 1
            problem = _check_command(kind, argv, subcommands)
            if problem:
                bad.append(f"{where}: `l3rs {' '.join(argv)}`: {problem}")
    assert seen > 20, "the command scan found (almost) nothing: is it broken?"
    assert bad == []


def test_the_command_check_catches_mistakes():
    subcommands = _subcommands()
    found = dict(_documented_commands("x `l3rs submit --adress http://h:8265`\n  l3rs trian --config c.toml\n"))
    assert _check_command("span", found["span"], subcommands) == "unknown option(s) ['--adress']"
    assert _check_command("line", found["line"], subcommands) == "no such command (l3rs --help)"
    assert _check_command("line", ["logs"], subcommands) == "does not parse"  # the job id is required
    assert _check_command("span", ["logs"], subcommands) is None  # a mention of the command
    assert _check_command("span", ["data", "prepare", "--config", "X"], subcommands) is None  # a nested subcommand
    assert _check_command("span", ["data", "prepare", "--confg", "X"], subcommands) == "unknown option(s) ['--confg']"


def test_documented_repository_paths_exist():
    path_re = re.compile(r"(?<![\w./~-])((?:cluster|jobs|docker)/[\w./*{}-]*[\w*}])")
    placeholder = re.compile(r"[A-Z][A-Z0-9_]*(\.\w+)?")  # X.toml, CONFIG, ...
    missing, seen = [], 0
    for where, text in _doc_texts().items():
        for ref in path_re.findall(text):
            if any(c in ref for c in "*{}") or any(placeholder.fullmatch(part) for part in ref.split("/")):
                continue
            if ref.startswith("docker/dockerfile"):  # `# syntax=docker/dockerfile:1`, BuildKit's frontend
                continue
            seen += 1
            if not (REPO / ref).exists():
                missing.append(f"{where}: {ref}")
    assert seen > 20
    assert missing == []

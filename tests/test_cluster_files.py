"""Cluster files that must hold on a real launch, pinned dependencies, and monitoring docs that match the metrics.

Ray-free and fast. Each check guards one way a launch failed or drifted before (issue 13): workers without the
service account, a port-forward to a Service name KubeRay randomises, no data on autoscaled nodes, no registry login,
README in the dependency layer, two CUDA stacks, unpinned image dependencies, metric names documented other than
exported. (tests/test_ops_files.py checks the same files' syntax, schema and documented commands.)
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from l3rs.config import load_config
from l3rs.service.metrics import COUNTERS, EXPORTED, GAUGES, exported_name

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"
AWS, GCP = CLUSTER / "aws-gpu.yaml", CLUSTER / "gcp-gpu.yaml"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
IMAGENET = load_config(REPO / "jobs" / "configs" / "imagenet_resnet34.toml")
SYNC = "cluster/sync_data.py"
TFDS_HOME = "tensorflow_datasets"  # tfds's default data_dir under the home directory (data.data_dir = "")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


# ------------------------------------------------------------------------------------------------ VM clusters
def _image_registry(cfg: dict) -> str:
    return cfg["docker"]["image"].split("/", 1)[0]


def test_gcp_workers_get_the_service_account():
    cfg = _yaml(GCP)
    project = cfg["provider"]["project_id"]
    for name, node in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue  # Ray's GCP bootstrap sets the head's account itself
        accounts = node["node_config"].get("serviceAccounts")
        assert accounts, f"{name}: workers read θ0 and data from gs:// and pull the image: give them the account"
        assert accounts[0]["email"] == f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com", name
        assert "https://www.googleapis.com/auth/cloud-platform" in accounts[0]["scopes"], name


def test_aws_workers_get_the_instance_profile_of_the_image_account():
    cfg = _yaml(AWS)
    account = _image_registry(cfg).split(".", 1)[0]
    for name, node in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith(f"arn:aws:iam::{account}:instance-profile/"), (name, arn)


@pytest.mark.parametrize("path", [AWS, GCP], ids=lambda p: p.name)
def test_nodes_log_into_the_image_registry_before_the_pull(path):
    cfg = _yaml(path)
    registry = _image_registry(cfg)
    assert "." in registry, f"docker.image {cfg['docker']['image']!r} names no registry host"
    logins = [
        c
        for c in cfg.get("initialization_commands", [])  # on the host, before Ray pulls the image
        if re.search(rf"(docker login\b.*\s|configure-docker\s+){re.escape(registry)}(\s|$)", c)
    ]
    assert logins, f"{path.name}: no registry login for {registry} in initialization_commands"


@pytest.mark.parametrize("path,scheme", [(AWS, "s3"), (GCP, "gs")], ids=["aws", "gcp"])
def test_every_new_gpu_node_copies_the_imagenet_data(path, scheme):
    cfg = _yaml(path)
    # worker_setup_commands run on every worker node as it joins, the autoscaler's included.
    syncs = [shlex.split(c) for c in cfg["worker_setup_commands"] if SYNC in c]
    assert len(syncs) == 1, f"{path.name}: worker_setup_commands must run {SYNC}"
    argv = syncs[0]
    script = argv.index(next(a for a in argv if a.endswith(SYNC)))
    source, dest, datasets = argv[script + 1], argv[script + 2], argv[script + 3 :]
    assert source.startswith(f"{scheme}://"), source
    assert IMAGENET.data.data_dir == "" and dest == f"~/{TFDS_HOME}", "where tfds looks with data_dir = ''"
    assert {IMAGENET.data.dataset, IMAGENET.evaluate.other_dataset} <= set(datasets)
    # ... after the checkout is installed (setup_commands run before worker_setup_commands).
    assert any("pip install" in c and "~/l3rs" in c for c in cfg["setup_commands"])


# ------------------------------------------------------------------------------------------------ KubeRay
def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_pull_with_a_secret_and_workers_copy_the_data_first(path):
    doc = _yaml(path)
    for name, pod in _pod_specs(doc):
        assert {"name": "l3rs-registry"} in pod.get("imagePullSecrets", []), f"{name}: no image pull Secret"
        images = {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
        assert len(images) == 1, f"{name}: one image for every container, got {images}"
        if name == "head":
            continue
        init = [c for c in pod.get("initContainers", []) if any(a.endswith(SYNC) for a in c["command"])]
        assert len(init) == 1, f"{name}: worker pods must copy the data before Ray starts (initContainers)"
        argv = init[0]["command"]
        script = argv.index(next(a for a in argv if a.endswith(SYNC)))
        dest, datasets = argv[script + 2], argv[script + 3 :]
        assert {IMAGENET.data.dataset, IMAGENET.evaluate.other_dataset} <= set(datasets)
        # The copy lands in a volume the Ray container mounts where tfds looks (its home's tensorflow_datasets).
        volume = next(m["name"] for m in init[0]["volumeMounts"] if m["mountPath"] == dest)
        ray_container = pod["containers"][0]
        assert {"name": volume, "mountPath": dest} in ray_container["volumeMounts"]
        assert dest == f"/home/ray/{TFDS_HOME}" and volume in {v["name"] for v in pod["volumes"]}


def test_rayjob_dashboard_steps_find_the_generated_service_and_token():
    doc = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    name = doc["metadata"]["name"]
    for text in ((CLUSTER / "kuberay" / "rayjob.yaml").read_text(), (CLUSTER / "README.md").read_text()):
        # KubeRay names a RayJob's cluster <name>-<random>: a fixed Service name never exists.
        assert f"service/{name}-head-svc" not in text
        assert f"kubectl get rayjob {name} -o jsonpath='{{.status.rayClusterName}}'" in text
        assert 'kubectl get svc -l ray.io/cluster="$cluster",ray.io/node-type=head -o name' in text
        assert "kubectl get secret \"$cluster\" -o jsonpath='{.data.auth_token}'" in text


# ------------------------------------------------------------------------------------------------ sync_data.py
def _sync_main():
    spec = importlib.util.spec_from_file_location("sync_data", REPO / SYNC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_sync_data_copies_once_redoes_a_cut_copy_and_refuses_bad_input(tmp_path, capsys):
    main = _sync_main()

    def _sync(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    src, dest = tmp_path / "bucket", tmp_path / "node"
    (src / "ds" / "1.0.0").mkdir(parents=True)
    (src / "ds" / "1.0.0" / "shard-0").write_bytes(b"x" * 1000)
    (src / "ds" / "1.0.0" / "dataset_info.json").write_text("{}")
    first = _sync(str(src), str(dest), "ds")
    assert first.returncode == 0, first.stderr
    assert (dest / "ds" / "1.0.0" / "shard-0").read_bytes() == b"x" * 1000
    assert not (dest / "ds.partial").exists()
    # A complete copy is kept (even when the bucket changes); a cut one is redone.
    (src / "ds" / "1.0.0" / "shard-1").write_bytes(b"y")
    (dest / "ds.partial").mkdir()
    again = _sync(str(src), str(dest), "ds")
    assert again.returncode == 0 and "already on this node" in again.stdout
    assert not (dest / "ds" / "1.0.0" / "shard-1").exists() and (dest / "ds.partial").exists()
    (src / "other").mkdir()
    (src / "other" / "f").write_text("z")
    (dest / "other.partial").mkdir()
    (dest / "other.partial" / "stale").write_text("half")
    cut = _sync(str(src), str(dest), "other")
    assert cut.returncode == 0 and sorted(os.listdir(dest / "other")) == ["f"]
    # Bad input: one line, exit 2, nothing copied.
    placeholder = _sync("s3://YOUR-BUCKET/tensorflow_datasets", str(tmp_path / "n2"), "ds")
    assert placeholder.returncode == 2 and "placeholder" in placeholder.stderr
    assert len(placeholder.stderr.strip().splitlines()) == 1 and not (tmp_path / "n2").exists()
    missing = _sync(str(src), str(tmp_path / "n3"), "ds", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr and not (tmp_path / "n3").exists()


# ------------------------------------------------------------------------------------------------ Dockerfiles
def _instructions(path: Path) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _copy_sources(args: str) -> list[str]:
    return [t for t in shlex.split(args) if not t.startswith("--")][:-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependency_layer_comes_before_readme_and_code_and_is_pinned(path):
    instructions = _instructions(path)
    dep = next(
        i for i, (ins, args) in enumerate(instructions) if ins == "RUN" and "pip install" in args and "-r " in args
    )
    before = [src for ins, args in instructions[:dep] if ins == "COPY" for src in _copy_sources(args)]
    # Only what the dependency install reads: a README or code edit must not rebuild the multi-GB layer.
    assert set(before) <= {"pyproject.toml", "constraints.txt", "docker/constraints-cuda.txt"}, before
    after = [src for ins, args in instructions[dep:] if ins == "COPY" for src in _copy_sources(args)]
    assert {"README.md", "l3rs", "jobs", SYNC} <= set(after)
    # Every pip install that resolves from an index is held to constraints.txt (the one `make setup` uses).
    for ins, args in instructions:
        for cmd in re.findall(r"pip install[^&]*", args) if ins == "RUN" else []:
            if "--no-deps" not in cmd:
                assert "-c constraints.txt" in cmd, f"{path.name}: unpinned `{cmd.strip()}`"


def test_cuda_image_carries_one_cuda_stack():
    instructions = _instructions(DOCKER / "Dockerfile.cuda")
    base = next(args for ins, args in instructions if ins == "FROM")
    text = " ".join(args for _, args in instructions)
    assert '"jax[cuda12]"' in text, "JAX's CUDA 12 wheels are the image's CUDA"
    # ... so the base must not bring a second toolkit: Ray's -gpu / -cuXXX images and nvidia/cuda images do.
    assert not re.search(r"-gpu\b|-cu\d+|nvidia/cuda", base), base
    assert "NVIDIA_VISIBLE_DEVICES=all" in text  # what the NVIDIA runtime needs to mount the driver into the container
    assert "-c docker/constraints-cuda.txt" in text


def test_pins_agree_with_each_other_and_the_images():
    base, cuda = _pins(REPO / "constraints.txt"), _pins(DOCKER / "constraints-cuda.txt")
    assert not set(base) & set(cuda), "a package pinned twice"
    assert cuda["jax-cuda12-plugin"] == cuda["jax-cuda12-pjrt"] == base["jax"] == base["jaxlib"]
    assert "tensorflow-cpu" in cuda  # the `cluster` extra
    for path in DOCKERFILES:
        assert re.search(r"^ARG RAY_VERSION=(\S+)$", path.read_text(), re.M).group(1) == base["ray"], path.name


def _closure(name: str, extras: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed name -> version of ``name`` and everything it requires (with ``extras``), recursively."""
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}

    def visit(req_name: str, req_extras: set[str]) -> None:
        key = canonicalize_name(req_name)
        new = req_extras - seen.get(key, set())
        if key in seen and not new:
            return
        seen.setdefault(key, set()).update(req_extras)
        dist = md.distribution(req_name)
        versions[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in seen[key] | {""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                visit(req.name, set(req.extras))

    visit(name, set(extras))
    versions.pop(canonicalize_name(name))
    return versions


def test_constraints_pin_the_whole_dependency_closure_this_environment_runs():
    pins = _pins(REPO / "constraints.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = _closure("l3rs", ("dev",))
    # A dependency added to pyproject.toml without re-pinning, or an environment that drifted from the pins
    # (`make setup` installs with -c constraints.txt), fails here.
    assert set(installed) <= set(pins), sorted(set(installed) - set(pins))
    assert {n: v for n, v in installed.items() if pins[n] != v} == {}
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), spec


def test_make_setup_installs_from_the_constraints_and_the_system_tools():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "constraints.txt" in recipe.splitlines()[0], "the venv is rebuilt when the pins change"
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[dev\]\"", recipe)
    setup = re.search(r"^setup:(.*)$", makefile, re.M).group(1).split()
    tools = makefile.split("\ntools:", 1)[1].split("\n\n", 1)[0]
    assert "tools" in setup and "scripts/install_system.sh" in tools


# ------------------------------------------------------------------------------------------------ monitoring docs
def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^## ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + nxt.start()] if nxt else text[start:]


def test_exported_names_follow_rays_rules():
    assert set(EXPORTED) == {exported_name(n) for n in {**GAUGES, **COUNTERS}}
    assert exported_name("l3rs_units_done") == "ray_l3rs_units_done_total"
    assert exported_name("l3rs_generation") == "ray_l3rs_generation"
    with pytest.raises(KeyError):
        exported_name("l3rs_nope")


def test_cluster_readme_documents_exactly_the_exported_series():
    monitoring = _section((CLUSTER / "README.md").read_text(), "## Monitoring")
    rows = dict(re.findall(r"^\| `(ray_l3rs_\w+)` \| (gauge|counter) \|", monitoring, re.M))
    assert rows == {name: kind for name, (kind, _) in EXPORTED.items()}


def test_no_doc_names_a_series_that_is_not_exported():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(CLUSTER.rglob("*.md"))]
    docs += [REPO / "jobs" / "submit_example.sh", CLUSTER / "start_local.sh"]
    bad = []
    for path in docs:
        for name in re.findall(r"\bray_l3rs_\w+", path.read_text()):
            if name not in EXPORTED:
                bad.append(f"{path.relative_to(REPO)}: {name}")
    assert bad == []


def test_grafana_dashboard_queries_the_exported_series():
    dashboard = json.loads((CLUSTER / "monitoring" / "l3rs_grafana_dashboard.json").read_text())
    assert dashboard["uid"] == "l3rs" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    used = set(re.findall(r"\bray_l3rs_\w+", variables["run"]["definition"]))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_l3rs_\w+", target["expr"]))
            assert names and names <= set(EXPORTED), (panel["title"], target["expr"])
            assert 'run=~"$run"' in target["expr"], (panel["title"], target["expr"])
            # rate()/increase() only make sense on counters; counters only under them or summed as totals.
            for fn, name in re.findall(r"\b(rate|increase)\((ray_l3rs_\w+)", target["expr"]):
                assert EXPORTED[name][0] == "counter", (fn, name)
            used |= names
    assert used == set(EXPORTED), f"series without a panel: {sorted(set(EXPORTED) - used)}"


def test_prometheus_config_scrapes_rays_service_discovery():
    cfg = _yaml(CLUSTER / "monitoring" / "prometheus.yml")
    (job,) = cfg["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert Path(sd["files"][0]).name == PROMETHEUS_SERVICE_DISCOVERY_FILE


def test_install_system_is_a_no_op_where_prometheus_is_installed(tmp_path):
    script = REPO / "scripts" / "install_system.sh"
    fake = tmp_path / "bin" / "prometheus"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    # Installed system-wide (on PATH): nothing is downloaded or written.
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "L3RS_TOOLS_DIR": str(tmp_path / "tools")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "") and not (tmp_path / "tools").exists()
    # Already unpacked by an earlier run: the same.
    unpacked = tmp_path / "tools" / "prometheus" / "usr" / "bin" / "prometheus"
    unpacked.parent.mkdir(parents=True)
    unpacked.write_bytes(fake.read_bytes())
    unpacked.chmod(0o755)
    env["PATH"] = "/usr/bin:/bin"
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert (again.returncode, again.stderr) == (0, "") and os.listdir(tmp_path / "tools") == ["prometheus"]

"""Monitoring, for real: Debian's Prometheus scrapes a local Ray cluster (with dashboard) while a short run goes on.

Checks that every series documented in ``cluster/README.md`` (= :data:`l3rs.service.metrics.EXPORTED`, the names as
Prometheus sees them, counters with ``_total``) is scraped with the run's tag; that the counters exist at 0 before
anything happened; that generations agree between the driver's log, ``history.jsonl`` and the metric; that the
shipped ``cluster/monitoring/prometheus.yml`` finds the nodes through Ray's service-discovery file; that every query of
the shipped Grafana dashboard returns the run's data; and that worker actors are named per run.

Prometheus comes from ``make setup`` (``scripts/install_system.sh`` unpacks Debian's package into ``.tools/``); without
it the test skips and says so. Grafana is not packaged here: its dashboard JSON is checked against the metric names
in ``tests/test_cluster_files.py`` and its queries are run against this Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from l3rs.config import Config
from l3rs.service.metrics import EXPORTED, RunMetrics

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "cluster" / "monitoring"
LOOPBACK = "127.0.0.1"
GENERATIONS = 2
RUN = "prom-check"


def _prometheus_binary() -> str | None:
    for candidate in (
        os.environ.get("L3RS_PROMETHEUS"),
        str(Path(os.environ.get("L3RS_TOOLS_DIR", REPO / ".tools")) / "prometheus" / "usr" / "bin" / "prometheus"),
        shutil.which("prometheus"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Prometheus:
    """Prometheus on 127.0.0.1 with the shipped config, pointed at ``discovery`` and scraping every second."""

    def __init__(self, binary: str, discovery: str, workdir: Path) -> None:
        cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        sd = cfg["scrape_configs"][0]["file_sd_configs"][0]
        assert sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]  # Ray's default temp dir
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
        sd["files"], sd["refresh_interval"] = [discovery], "1s"  # this cluster's temp dir
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg))
        self.url = f"http://{LOOPBACK}:{_free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait(self._ready, 30, "Prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"Prometheus exited: {self.tail()}"
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; Prometheus log: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A Ray cluster with dashboard (which writes the service-discovery file) on loopback, connected, and Prometheus."""
    binary = _prometheus_binary()
    if binary is None:
        pytest.skip("no Prometheus: run `make setup` (scripts/install_system.sh) or set L3RS_PROMETHEUS")
    import ray
    from ray.cluster_utils import Cluster

    from l3rs.service.raycluster import connect

    if ray.is_initialized():  # another module's driver
        ray.shutdown()
    # Short: Ray's socket paths live under the temp dir and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="l3rs-prom-", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": LOOPBACK,
            "num_cpus": 2,
            "num_gpus": 0,
            "object_store_memory": 150 * 1024 * 1024,
            "include_dashboard": True,
            "dashboard_host": LOOPBACK,
            "dashboard_port": None,
            "temp_dir": temp_dir,
            # Report metrics every second (default 10 s), so the test need not wait for them.
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    prom = None
    try:
        connect(cluster.address)
        discovery = os.path.join(temp_dir, "prom_metrics_service_discovery.json")
        deadline = time.monotonic() + 60
        while not (os.path.exists(discovery) and json.loads(Path(discovery).read_text() or "[]")):
            assert time.monotonic() < deadline, "the Ray dashboard wrote no service-discovery file"
            time.sleep(0.5)
        prom = Prometheus(binary, discovery, tmp_path_factory.mktemp("prometheus"))
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_config(storage: Path) -> Config:
    return Config().replace(
        run={"name": RUN, "storage": str(storage), "checkpoint_every": GENERATIONS, "seed": 3},
        data={"dataset": "sklearn_digits"},
        model={"name": "small_cnn", "checkpoint": "random"},
        task={"num_classes": 3, "batch_size": 32, "eval_batch_size": 64, "k_min": 10, "k_max": 20},
        nes={"population_size": 4, "meta_batch_size": 1, "generations": GENERATIONS},
        workers={"min_workers": 1, "max_workers": 1, "resources": {"CPU": 1.0}, "unit_timeout_s": 120.0},
    )


def _by_name(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["__name__"]: float(r["value"][1]) for r in results}


def test_every_documented_series_is_scraped_during_a_run(monitored, tmp_path, capsys):
    import ray

    from l3rs.service.driver import Driver

    driver = Driver(_tiny_config(tmp_path), progress=False)
    pool = driver.make_pool()
    with pool:  # shut down (its workers killed) however the test ends
        pool.warm_up(1, timeout_s=0)  # starts the worker (it loads data and compiles) while the next check runs

        # Counters (and the generation gauge) exist at 0 as soon as a run's metrics are created, before any work.
        RunMetrics("prom-fresh")
        fresh = monitored._wait(
            lambda: _by_name(monitored.query('{__name__=~"ray_l3rs_.+", run="prom-fresh"}')) or None, 30, "fresh"
        )
        assert fresh == {
            "ray_l3rs_generation": 0.0,
            "ray_l3rs_unit_retries_total": 0.0,
            "ray_l3rs_worker_failures_total": 0.0,
            "ray_l3rs_units_done_total": 0.0,
        }

        result = driver.run(pool=pool)
        # Workers are named per run, so the dashboard's Actors page tells runs apart.
        worker = ray.get_actor(f"l3rs:{RUN}:worker-0")
        assert ray.get(worker.ready.remote())
    log = capsys.readouterr().out

    # Every documented series, with the run's tag, and nothing undocumented.
    def scraped() -> dict[str, float] | None:
        values = _by_name(monitored.query(f'{{__name__=~"ray_l3rs_.+", run="{RUN}"}}'))
        return values if set(values) == set(EXPORTED) and values["ray_l3rs_generation"] == GENERATIONS else None

    try:
        values = monitored._wait(scraped, 30, "every documented series")
    except AssertionError:
        got = _by_name(monitored.query(f'{{__name__=~"ray_l3rs_.+", run="{RUN}"}}'))
        raise AssertionError(f"scraped {got}; documented {sorted(EXPORTED)}") from None
    units = GENERATIONS * 2  # population 4 = 2 antithetic pairs, meta-batch 1
    assert values["ray_l3rs_units_done_total"] == units
    assert values["ray_l3rs_unit_retries_total"] == 0 and values["ray_l3rs_worker_failures_total"] == 0
    assert values["ray_l3rs_live_workers"] == 1

    # One convention for generations: log "gen N/T", history's generations_completed and the gauge agree.
    with open(os.path.join(result.run_dir, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["generations_completed"] for r in rows] == list(range(1, GENERATIONS + 1))
    assert [r["generation"] for r in rows] == list(range(GENERATIONS))  # the 0-based index old readers use
    assert re.findall(rf"\[{RUN}\] gen (\d+)/{GENERATIONS}", log) == [str(n) for n in range(1, GENERATIONS + 1)]
    assert values["ray_l3rs_generation"] == rows[-1]["generations_completed"] == result.generations

    # Every query of the shipped Grafana dashboard returns this run's data.
    dashboard = json.loads((MONITORING / "l3rs_grafana_dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$run", RUN).replace("$__rate_interval", "1m").replace("$__range", "5m")
            found = monitored.query(expr)
            assert any(r["metric"].get("run") == RUN for r in found), (panel["title"], expr, found)


def test_worker_names_stay_unique_across_pools_and_replacements(monitored):
    import ray

    from l3rs.service.pool import ElasticPool

    class Echo:
        def run(self, x: int) -> int:
            return x

    prefix = "l3rs:names:worker-"
    first = ElasticPool(Echo, resources={"CPU": 0.5}, max_workers=1, actor_name_prefix=prefix, name="first")
    second = ElasticPool(Echo, resources={"CPU": 0.5}, max_workers=1, actor_name_prefix=prefix, name="second")
    try:
        assert first.warm_up(1, timeout_s=60) == 1
        assert second.warm_up(1, timeout_s=60) == 1  # worker-0 is taken by the first pool's live actor
        a, b = ray.get_actor(prefix + "0"), ray.get_actor(prefix + "0.2")
        assert a._actor_id != b._actor_id
        ray.kill(a, no_restart=True)  # the pool replaces a dead worker under the next index
        from l3rs.service.pool import WorkUnit

        assert first.run([WorkUnit(key=1, payload=7)]) == {1: 7}
        assert ray.get(ray.get_actor(prefix + "1").run.remote(3)) == 3
    finally:
        first.shutdown()
        second.shutdown()

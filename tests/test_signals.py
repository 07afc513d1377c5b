"""Ctrl-C and SIGTERM stop a real ``l3rs train`` within seconds, with one line, a documented exit code (130 / 143),
no traceback and no crash dump; rerunning the same command resumes to the undisturbed run's ψ sha256.

The runs join the session cluster with one logical-GPU node (GPU workers never pin themselves to a core, so the
numerics do not depend on what else holds the core locks on this machine).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STOP_LINE = re.compile(
    r"^stopped at generation (\d+); the last checkpoint is generation (\d+); rerun the same command to resume$"
)
GENERATIONS = 12

CONFIG = f"""
[run]
name = "sig"
storage = "{{storage}}"
checkpoint_every = 1
[data]
dataset = "sklearn_digits"
[model]
checkpoint = "random"
[task]
num_classes = 3
batch_size = 16
eval_batch_size = 32
k_min = 3
k_max = 6
[nes]
population_size = 4
meta_batch_size = 1
generations = {GENERATIONS}
[workers]
min_workers = 1
max_workers = 1
resources = {{{{ GPU = 1 }}}}
[evaluate]
k_grid = [5, 10]
"""


@pytest.fixture(scope="module")
def gpu_node(ray_connected):
    node = ray_connected.add_node(num_cpus=1, num_gpus=1)
    try:
        yield ray_connected
    finally:
        ray_connected.remove_node(node)


def _train(cluster, tmp_path: Path, stop: tuple[signal.Signals, str] | None) -> subprocess.CompletedProcess:
    """``l3rs train`` as a user runs it; with ``stop=(signal, line)``, sends the signal once ``line`` is printed."""
    env = {**cluster.loopback_env(), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "l3rs.cli", "train", "--config", "sig.toml", "--address", cluster.address]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop is None:
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
    sig, wanted = stop
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # the driver prints (and flushes) one line per generation
        lines.append(line)
        if wanted in line or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(lines) + out, err)


def _stop_line(err: str) -> tuple[int, int]:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGTERM received" not in err and "PC: @" not in err, err  # no crash dump from Ray's C++ handler
    found = [m for m in map(STOP_LINE.match, err.splitlines()) if m]
    assert len(found) == 1, err
    return int(found[0].group(1)), int(found[0].group(2))


def test_sigint_and_sigterm_stop_and_resume_to_the_same_psi(gpu_node, tmp_path):
    from l3rs.config import load_config
    from l3rs.service.driver import Driver

    (tmp_path / "sig.toml").write_text(CONFIG.format(storage=tmp_path / "runs"))

    first = _train(gpu_node, tmp_path, (signal.SIGINT, f"gen 2/{GENERATIONS}"))
    assert first.returncode == 130, first.stderr
    g, c = _stop_line(first.stderr)
    # g: generations completed; c: those in the newest checkpoint (checkpoint_every = 1; the signal may land between
    # a generation's log line and its checkpoint, and then c = g - 1)
    assert 1 <= c <= g < GENERATIONS and g - c <= 1

    second = _train(gpu_node, tmp_path, (signal.SIGTERM, f"gen {g + 2}/{GENERATIONS}"))
    assert second.returncode == 143, second.stderr
    assert f"from checkpoint at generation {c}" in second.stderr and f"gen {c + 1}/{GENERATIONS}" in second.stdout
    g2, c2 = _stop_line(second.stderr)
    assert g + 1 <= c2 <= g2 < GENERATIONS

    third = _train(gpu_node, tmp_path, None)
    assert third.returncode == 0, third.stderr
    resumed = json.loads(third.stdout.strip().splitlines()[-1])
    assert resumed["generations"] == GENERATIONS

    cfg = load_config(tmp_path / "sig.toml").replace(run={"name": "undisturbed"})
    undisturbed = Driver(cfg, progress=False).run()
    assert resumed["psi_sha256"] == undisturbed.psi_sha256


def test_a_signal_wrapped_by_a_c_extension_still_stops_the_run_cleanly(ray_connected, tmp_path, monkeypatch):
    """Ctrl-C while the driver blocks in Ray's Cython ``CoreWorker.wait`` (e.g. during the first generation) reaches
    train() as ``SystemError: ... returned a result with an exception set``, the handler's exception as its cause.
    train() still raises TrainingStopped (the CLI's resume line and exit code 130), not "failed: SystemError"."""
    import l3rs.api as api
    from l3rs.config import load_config
    from l3rs.service.driver import Driver

    def run(self: Driver, **kwargs: object) -> None:
        try:
            signal.raise_signal(signal.SIGINT)  # the handler raises here, as it does inside the extension's call
        except BaseException as e:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from e

    (tmp_path / "sig.toml").write_text(CONFIG.format(storage=tmp_path / "runs"))
    cfg = load_config(tmp_path / "sig.toml")
    monkeypatch.setattr(Driver, "run", run)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(api.TrainingStopped) as stopped:
            api.train(cfg, stop_on_signals=True, progress=False)
    finally:
        for sig, handler in before.items():  # train() keeps its handlers after a signal (so clean-up is not cut)
            signal.signal(sig, handler)
    assert stopped.value.signum == signal.SIGINT
    assert (
        str(stopped.value)
        == "stopped at generation 0; there is no checkpoint yet; rerun the same command to start again"
    )
    # Without a signal, the same error is the run's failure, not a stop.
    monkeypatch.setattr(Driver, "run", lambda self, **kwargs: (_ for _ in ()).throw(SystemError("boom")))
    with pytest.raises(SystemError, match="boom"):
        api.train(cfg, stop_on_signals=True, progress=False)

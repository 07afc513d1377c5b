"""Talking to a cluster's dashboard (Ray's Jobs API) from the ``l3rs`` job commands, with errors a person can act on.

``--address`` of ``l3rs submit / status / logs / stop / fetch`` is always the **dashboard URL** (``http://HEAD:8265``;
a bare ``HOST:PORT`` means ``http://HOST:PORT``). Without the flag: ``L3RS_DASHBOARD`` (written by
``cluster/start_local.sh``'s env.sh), then ``RAY_API_SERVER_ADDRESS``. The flag always wins: Ray's own SDK lets
``RAY_ADDRESS`` override an explicit address, which :func:`job_client` prevents.

Authentication: a token is sent whenever one exists (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``), whether or not ``RAY_AUTH_MODE=token`` is set (:func:`auth_token`, :func:`adopt_token_auth`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

__all__ = [
    "ClusterUnreachable",
    "JobNotFound",
    "adopt_token_auth",
    "auth_token",
    "autoscaler_can_add_nodes",
    "cluster_nodes",
    "dashboard_address",
    "head_shares_filesystem",
    "job_client",
    "job_info",
    "probe_dashboard",
]

PROBE_TIMEOUT_S = 10.0


class ClusterUnreachable(ConnectionError):
    """No Ray dashboard answers at the address (exit code 3); the message says what to check."""


class JobNotFound(LookupError):
    """The cluster has no job with this id (exit code 2)."""


def auth_token() -> str | None:
    """The Ray auth token this user has, looked up as Ray does: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``; ``None`` if there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def adopt_token_auth() -> None:
    """Sets ``RAY_AUTH_MODE=token`` for this process when a token exists and the mode is unset.

    Must run before Ray reads its config (before ``ray.init``). An explicit ``RAY_AUTH_MODE`` (e.g. ``disabled``)
    is left alone.
    """
    if not os.environ.get("RAY_AUTH_MODE") and auth_token():
        os.environ["RAY_AUTH_MODE"] = "token"


def dashboard_address(flag: str | None) -> str:
    """The dashboard URL a job command talks to: the flag, else ``L3RS_DASHBOARD``, else ``RAY_API_SERVER_ADDRESS``.

    ``HOST:PORT`` becomes ``http://HOST:PORT``; a trailing ``/`` is dropped.

    Raises:
      ValueError: no address anywhere, or a ``ray://`` (Ray Client) address, which job commands do not take.
    """
    address = flag or os.environ.get("L3RS_DASHBOARD") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ValueError(
            "--address: which cluster? Give its dashboard URL, e.g. --address http://127.0.0.1:8265 "
            "(or `source` the env.sh that cluster/start_local.sh printed, which sets L3RS_DASHBOARD)."
        )
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ValueError(
            f"--address: {address!r} is a Ray Client address; job commands take the dashboard URL, "
            "e.g. http://HEAD:8265."
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address: {address!r} must be an http:// or https:// dashboard URL.")
    return address


def _headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def probe_dashboard(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """``GET /api/version`` on the dashboard; returns its JSON (``ray_version``, ``session_name``).

    Raises:
      ClusterUnreachable: nothing listens, it is not a Ray dashboard (e.g. the GCS port 6379), it timed out, or it
        refused our token; the message names the address and what to do.
    """
    request = urllib.request.Request(f"{address}/api/version", headers=_headers())
    hint = (
        "check that the cluster is running and that this is its dashboard URL (job commands take the dashboard, "
        "e.g. http://HEAD:8265, not the GCS address HOST:6379)"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ClusterUnreachable(
                f"the dashboard at {address} refused our credentials (HTTP {e.code}): set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head prints it)."
            ) from e
        raise ClusterUnreachable(f"{address} answered HTTP {e.code} to /api/version: {hint}.") from e
    except http.client.HTTPException as e:  # something answered, not in HTTP: e.g. the GCS's gRPC port
        raise ClusterUnreachable(f"{address} does not speak HTTP ({type(e).__name__}): {hint}.") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ClusterUnreachable(f"cannot reach a Ray dashboard at {address} ({reason}): {hint}.") from e
    try:
        info = json.loads(body)
        if not isinstance(info, dict) or "ray_version" not in info:
            raise ValueError
    except ValueError:
        raise ClusterUnreachable(f"{address} answered, but it is not a Ray dashboard: {hint}.") from None
    return info


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its address: hide them."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str) -> Any:
    """A ``ray.job_submission.JobSubmissionClient`` for exactly ``address`` (a normalised dashboard URL).

    Probes the address first (:func:`probe_dashboard`), so an unreachable cluster fails within seconds.
    """
    probe_dashboard(address)
    from ray.job_submission import JobSubmissionClient

    with _without_address_env():
        return JobSubmissionClient(address, headers=_headers())


def job_info(client: Any, job_id: str, address: str) -> Any:
    """``client.get_job_info(job_id)``, raising :class:`JobNotFound` with a helpful message for an unknown id."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobNotFound(
                f"no job {job_id!r} on the cluster at {address}: use the id `l3rs submit` printed "
                "(the dashboard's Jobs page lists them)."
            ) from None
        raise


def _session_dirs(session_name: str) -> list[str]:
    roots = [os.environ.get("RAY_TEMP_DIR"), "/tmp/ray"]
    try:
        from ray._common.utils import get_user_temp_dir  # Ray >= 2.4x

        roots.append(os.path.join(get_user_temp_dir(), "ray"))
    except Exception:
        pass
    return [os.path.join(r, session_name) for r in roots if r]


def head_shares_filesystem(version_info: dict[str, Any]) -> bool:
    """Whether the cluster's head runs on this machine (so it sees this machine's files).

    Decided by the head's Ray session folder (``session_<date>_<time>_<microseconds>_<pid>``, from the dashboard's
    ``/api/version``): a head on this machine has it under the Ray temp folder here (``RAY_TEMP_DIR`` or
    ``/tmp/ray``). A ``127.0.0.1`` address alone proves nothing: ``ray dashboard`` and ``kubectl port-forward``
    tunnels to remote heads are ``127.0.0.1`` too.
    """
    name = str(version_info.get("session_name") or "")
    if not name.startswith("session_"):
        return False
    return any(os.path.isdir(d) for d in _session_dirs(name))


def cluster_nodes(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[list[dict[str, float]], bool]:
    """``(resources_total of every alive node, whether the cluster has an autoscaler)`` from the dashboard.

    Returns ``([], True)`` (nothing known, assume it may grow) when the dashboard does not answer these APIs.
    """

    def get(path: str) -> Any:
        request = urllib.request.Request(f"{address}{path}", headers=_headers())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    try:
        nodes = get("/api/v0/nodes?detail=1")["data"]["result"]["result"]
        status = get("/api/cluster_status?format=0")["data"]
    except Exception:
        return [], True
    alive = [dict(n.get("resources_total") or {}) for n in nodes if n.get("state") == "ALIVE"]
    report = (status.get("clusterStatus") or {}).get("autoscalerReport")
    return alive, autoscaler_can_add_nodes(report.get("nodeTypeMapping") if isinstance(report, dict) else None)


def autoscaler_can_add_nodes(node_type_mapping: dict[str, str] | None) -> bool:
    """From the autoscaler's report (node id -> node type): whether a real autoscaler runs.

    A cluster started with ``ray start`` and no autoscaling config runs the autoscaler read-only; it names each
    node's type ``node_<node id>``. ``None`` (no report: autoscaler v2, or not reported yet) counts as "may grow".
    """
    if node_type_mapping is None:
        return True
    return not all(str(t) == f"node_{n}" for n, t in node_type_mapping.items())

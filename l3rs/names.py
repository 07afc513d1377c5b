"""How shared outputs (reports, figure titles) name files and runs: never by an absolute machine path.

A report is read on other machines; ``/home/alice/runs/demo/pretrain-fmnist`` says nothing there and leaks the
author's disk. :func:`display_uri` names a checkpoint, run or artifact relative to the run storage root
(``runs/demo/pretrain-fmnist`` with storage ``runs/demo`` → ``pretrain-fmnist``), else by the config's own relative
string, else relative to the working directory, else by its last component (``…/pretrain-fmnist``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = ["display_uri", "scrub_paths"]

ELLIPSIS = "…/"


def _local(uri: str) -> str | None:
    """The local path of ``uri`` (``file://`` stripped), or None for a remote URI (``s3://``, ``gs://``)."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        return None
    return uri


def _under(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` when it lies strictly inside it, else None (both absolute, normalised)."""
    if path != root and path.startswith(root.rstrip("/") + "/"):
        return os.path.relpath(path, root)
    return None


def display_uri(uri: str, *, root: str | None = None, given: str | None = None, cwd: str | None = None) -> str:
    """The name of ``uri`` in a shared report: never an absolute local path.

    In order: ``"random"`` and ``""`` as they are; a path inside the run storage ``root`` relative to it; the
    config's own string ``given`` if that was relative; a path inside the working directory ``cwd`` (default
    ``os.getcwd()``) relative to it; else ``"…/<last component>"``. A remote URI (``s3://``, ``gs://``) names no
    machine's disk: it is kept, or made relative to a remote ``root`` it lies in.

    Args:
      uri: the path or URI to name (absolute or not).
      root: the run storage root (``run.storage``), local or remote.
      given: the string the user wrote in the config for this path, if any.
      cwd: the directory relative paths were resolved against (default: the current one).
    """
    if uri in ("", "random"):
        return uri
    local = _local(uri)
    root_local = _local(root) if root else None
    if local is None:  # a remote URI: relative to a remote root, else as it is (it is not a machine path)
        if root and root_local is None:
            inside = _under(uri.rstrip("/"), root.rstrip("/"))
            if inside is not None:
                return inside
        return uri
    path = os.path.normpath(os.path.abspath(os.path.expanduser(local)))
    if root_local:
        inside = _under(path, os.path.normpath(os.path.abspath(os.path.expanduser(root_local))))
        if inside is not None:
            return inside
    if given:
        given_local = _local(given)
        if given_local and not os.path.isabs(given_local) and not given_local.startswith("~"):
            return os.path.normpath(given_local)
    base = os.path.normpath(os.path.abspath(cwd or os.getcwd()))
    inside = _under(path, base)
    if inside is not None:
        return inside
    return ELLIPSIS + (os.path.basename(path) or path.strip("/"))


def scrub_paths(text: str, uris: Iterable[str], **kwargs: str | None) -> str:
    """``text`` (e.g. an error message) with every occurrence of the local ``uris`` replaced by their
    :func:`display_uri` names (longest first, so a folder does not clip a file inside it). ``kwargs`` go to
    :func:`display_uri`."""
    names = {}
    for uri in uris:
        local = _local(uri) if uri else None
        if not local:
            continue
        for form in {local, os.path.normpath(os.path.abspath(os.path.expanduser(local)))}:
            names[form] = display_uri(uri, **kwargs)
    for form in sorted(names, key=len, reverse=True):
        text = re.sub(re.escape(form), names[form].replace("\\", r"\\"), text)
    return text

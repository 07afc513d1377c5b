"""Run storage through URIs: local paths, ``file://``, ``s3://``, ``gs://`` (anything ``pyarrow.fs`` reads).

Every function takes a URI string. Local paths (absolute or relative, ``~`` expanded) and ``file://`` URIs
go to the local file system; other schemes go through ``pyarrow.fs.FileSystem.from_uri``, so credentials and
endpoints come from the usual environment of the cloud SDKs.

Writes are atomic: locally, :func:`write_bytes_atomic` writes a temporary file in the same directory, fsyncs
it and ``os.replace``-s it over the target (then fsyncs the directory), so readers see the old or the new
content, never a mix; on object stores a single PUT is atomic by itself.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid

import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "is_local",
    "join",
    "exists",
    "read_bytes",
    "write_bytes_atomic",
    "delete_file",
    "listdir",
    "makedirs",
    "copy_tree",
    "check_writable",
]


class StorageError(OSError):
    """A storage location cannot be used; the message names the URI."""


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage uri: must be a non-empty string, got {uri!r}.")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Joins path components onto a local path or a URI (``/`` separators for URIs)."""
    if "://" not in uri:
        return os.path.join(uri, *parts)
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def exists(uri: str) -> bool:
    fs, path = _resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of a file; FileNotFoundError (or the store's OSError) if it is missing."""
    fs, path = _resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def makedirs(uri: str) -> None:
    """Creates the directory and its parents (a no-op on object stores without directories)."""
    fs, path = _resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Writes ``data`` to ``uri`` atomically, creating parent directories.

    Local: temporary file in the target's directory, fsync, ``os.replace``, fsync of the directory. If
    anything fails the temporary file is removed and any previous file at ``uri`` is left intact. Object
    stores: one PUT.
    """
    data = bytes(data)
    fs, path = _resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        parent = posixpath.dirname(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def delete_file(uri: str, *, missing_ok: bool = True) -> None:
    fs, path = _resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def listdir(uri: str) -> list[str]:
    """Sorted names (not paths) of the entries directly under ``uri``; ``[]`` if it does not exist."""
    fs, path = _resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def copy_tree(src_uri: str, dst_uri: str) -> None:
    """Copies every file under ``src_uri`` to the same relative path under ``dst_uri`` (each file atomically).

    Raises FileNotFoundError naming ``src_uri`` if it is not an existing directory.
    """
    fs, root = _resolve(src_uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"copy_tree: source {src_uri!r} is not an existing directory.")
    makedirs(dst_uri)
    root = root.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) :].lstrip("/")
        dst = join(dst_uri, *rel.split("/"))
        if info.type == pafs.FileType.Directory:
            makedirs(dst)
        elif info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                write_bytes_atomic(dst, f.read())


def check_writable(uri: str) -> None:
    """Creates ``uri`` as a directory and writes, reads back and deletes a probe file in it.

    Raises:
      StorageError: naming ``uri`` and the underlying reason, if any step fails.
    """
    probe = join(uri, f".l3rs-write-probe-{uuid.uuid4().hex}")
    payload = b"l3rs write probe"
    try:
        makedirs(uri)
        write_bytes_atomic(probe, payload)
        if read_bytes(probe) != payload:
            raise OSError("the probe file read back different bytes")
        delete_file(probe)
    except (OSError, ValueError) as e:
        raise StorageError(f"storage {uri!r} is not writable: {type(e).__name__}: {e}") from e

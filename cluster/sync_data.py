"""Copies prepared tfds datasets from a bucket onto this node's disk, once per node.

Run on every GPU node as it joins, before its workers read data: by ``worker_setup_commands`` in
cluster/aws-gpu.yaml and cluster/gcp-gpu.yaml (autoscaled nodes included) and by the ``sync-data`` init container of
the KubeRay worker pods.

    python cluster/sync_data.py SOURCE DEST DATASET [DATASET ...]

SOURCE is a folder of prepared tfds datasets (``s3://BUCKET/tensorflow_datasets``, ``gs://...`` or a path; read with
pyarrow.fs and the node's own credentials: instance profile, service account, Workload Identity/IRSA), DEST the
node's tfds ``data_dir`` (``~/tensorflow_datasets`` when the config's ``data.data_dir`` is ""). Each DATASET is copied
to ``DEST/DATASET.partial`` and renamed to ``DEST/DATASET`` once complete: a complete copy is never redone, a copy
cut short is redone, and a reader never sees half a dataset. Bad input (an unedited ``YOUR-...`` placeholder, a
dataset missing at SOURCE) exits 2 with one line naming it, before anything is copied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from filelock import FileLock

from l3rs import storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder of prepared tfds datasets: s3://..., gs://... or a path")
    parser.add_argument("dest", help="this node's tfds data_dir, e.g. ~/tensorflow_datasets")
    parser.add_argument("datasets", nargs="+", help="dataset folder names, e.g. imagenet2012")
    args = parser.parse_args(argv)
    if "YOUR-" in args.source:
        print(f"sync_data: SOURCE {args.source!r} is a placeholder: edit it (the line marked EDIT).", file=sys.stderr)
        return 2
    missing = [d for d in args.datasets if not storage.exists(storage.join(args.source, d))]
    if missing:
        print(f"sync_data: no dataset {', '.join(missing)} under {args.source!r}.", file=sys.stderr)
        return 2
    dest = os.path.abspath(os.path.expanduser(args.dest))
    os.makedirs(dest, exist_ok=True)
    with FileLock(os.path.join(dest, ".sync_data.lock")):  # two setups on one node copy once
        for name in args.datasets:
            final, partial = os.path.join(dest, name), os.path.join(dest, name + ".partial")
            if os.path.isdir(final):
                print(f"sync_data: {name} already on this node ({final})")
                continue
            start = time.monotonic()
            shutil.rmtree(partial, ignore_errors=True)  # a copy cut short
            storage.copy_tree(storage.join(args.source, name), partial)
            os.replace(partial, final)
            print(f"sync_data: copied {name} to {final} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Installs the embedded default dataset: Debian's dataset-fashion-mnist (IDX files in /usr/share/datasets/).
# Uses apt-get as root, sudo otherwise; where neither works, says how to proceed (tfds's official download).
set -euo pipefail
target=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$target" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_data: no apt-get here; on a machine with internet set data.dataset = \"fashion_mnist\" (official tfds)." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install_data: need root or sudo for 'apt-get install dataset-fashion-mnist'." >&2; exit 1
  fi
fi
echo "install_data: apt-get install dataset-fashion-mnist" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
test -f "$target"

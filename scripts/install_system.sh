#!/usr/bin/env bash
# Installs the system tools the test suite needs that pip cannot provide: Prometheus (Debian's `prometheus`
# package), which tests/test_prometheus.py starts on 127.0.0.1 to scrape a local Ray cluster's l3rs metrics.
#
# The .deb is downloaded (`apt-get download`) and unpacked into .tools/prometheus/ of this checkout
# (L3RS_TOOLS_DIR overrides .tools): no system service is installed or started, and no root is needed where apt's
# package lists exist. Idempotent: does nothing when .tools/prometheus/usr/bin/prometheus is there or a `prometheus`
# is on PATH (e.g. the package is installed system-wide). Where there is no apt-get, or the package cannot be
# downloaded, it says so and exits 0 (the Prometheus test then skips and says why).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${L3RS_TOOLS_DIR:-$repo/.tools}/prometheus"
if [ -x "$dest/usr/bin/prometheus" ] || command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "install_system: no apt-get/dpkg-deb here; install Prometheus >= 2.42 yourself (on PATH) for tests/test_prometheus.py." >&2
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "install_system: apt-get download prometheus -> $dest" >&2
download() { (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); }
if ! download; then
  # No package lists yet (a fresh container): refresh them, as root or with sudo, and try once more. A machine that
  # cannot get the package still sets up (`make demo` does not need it); the Prometheus test then skips and says why.
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
  if ! { $sudo apt-get update -qq && download; }; then
    echo "install_system: could not download Debian's prometheus package; tests/test_prometheus.py will skip." >&2
    exit 0
  fi
fi
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
"$tmp/root/usr/bin/prometheus" --version >/dev/null
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/root" "$dest.partial"
mv "$dest.partial" "$dest"  # appears complete or not at all

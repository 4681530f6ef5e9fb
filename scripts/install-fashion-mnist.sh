#!/usr/bin/env bash
# Install Fashion-MNIST (standard IDX .gz files) from Debian's package when it is missing.
set -euo pipefail
root=/usr/share/datasets/fashion-mnist
if [ -f "$root/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ -n "${RELA_DATA:-}" ] && { [ -f "$RELA_DATA/train-images-idx3-ubyte.gz" ] || [ -f "$RELA_DATA/fashion-mnist/train-images-idx3-ubyte.gz" ]; }; then exit 0; fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "Installing Fashion-MNIST from Debian's package dataset-fashion-mnist ..."
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
}
test -f "$root/train-images-idx3-ubyte.gz" || { echo "Fashion-MNIST install failed: $root is empty" >&2; exit 1; }

#!/usr/bin/env bash
# Extract the modern-English text (mea.data, domain "modern") from two Debian documentation packages into DEST:
# the Python 3.11 documentation sources (calibration, recovery) and the Debian Reference (held-out text).
# Needs apt-get (no root: `apt-get download` only fetches the .deb files) and dpkg-deb.
set -euo pipefail
dest=$(realpath -m "${1:?usage: fetch_text.sh DEST}")
if [ -d "$dest/usr/share/doc/python3.11/html/_sources" ] && [ -d "$dest/usr/share/debian-reference" ]; then exit 0; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download python3.11-doc debian-reference-en >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get download python3.11-doc debian-reference-en >/dev/null
fi
mkdir -p "$tmp/x"
dpkg-deb --fsys-tarfile python3.11-doc_*.deb | tar -x -C "$tmp/x" ./usr/share/doc/python3.11/html/_sources
dpkg-deb --fsys-tarfile debian-reference-en_*.deb | tar -x -C "$tmp/x" ./usr/share/debian-reference
mkdir -p "$dest"
rm -rf "$dest/usr"
mv "$tmp/x/usr" "$dest/usr"

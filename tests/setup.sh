#!/usr/bin/env bash
# Installs what the tests need on a fresh machine (idempotent, quick when everything is there).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$repo/.cache"
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need_py=()
python3 -c 'import azure.identity' 2>/dev/null || need_py+=(azure-identity)
if [ "${#need_py[@]}" -gt 0 ]; then
  log "pip install ${need_py[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${need_py[@]}"
fi
for tool in go cargo openssl curl; do
  command -v "$tool" >/dev/null || { log "ERROR: $tool is required"; exit 1; }
done

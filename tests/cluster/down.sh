#!/usr/bin/env bash
# Stops the local control plane started by up.sh. --purge also removes its state (certificates, etcd data).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${AZP_CLUSTER_DIR:-$repo/.cache/cluster}

for c in controller-manager apiserver etcd; do
  pidfile="$state/$c.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$state"
fi
echo "[cluster] stopped" >&2

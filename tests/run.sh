#!/usr/bin/env bash
# The test command: installs what the tests need, starts the local control plane (built once, cached),
# runs every test of the workspace against it, and stops it again.
#
#   tests/run.sh                 all tests
#   tests/run.sh <cargo test args>  e.g. tests/run.sh -p azp-testbed --test node_jobs
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
log() { printf '[tests %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

"$repo/tests/setup.sh"

started_cluster=0
if ! "$repo/tests/cluster/up.sh" >/dev/null 2>"$repo/.cache/cluster-up.log"; then
  cat "$repo/.cache/cluster-up.log" >&2
  exit 1
fi
cat "$repo/.cache/cluster-up.log" >&2
grep -q "already running" "$repo/.cache/cluster-up.log" || started_cluster=1
if [ "$started_cluster" = 1 ] && [ -z "${AZP_KEEP_CLUSTER:-}" ]; then
  trap '"$repo/tests/cluster/down.sh"' EXIT
fi
export KUBECONFIG="${AZP_CLUSTER_DIR:-$repo/.cache/cluster}/kubeconfig"

log "building the workspace binaries (the tests run them as processes)"
cargo build --workspace --bins
log "running the tests"
table="$repo/target/tmp/fault-suite-table.txt"
rm -f "$table"
status=0
if [ "$#" -gt 0 ]; then
  cargo test "$@" || status=$?
else
  cargo test --workspace --no-fail-fast || status=$?
fi
# The fault suite's table of scenarios × invariants (cargo test hides a passing test's output).
[ -f "$table" ] && cat "$table" >&2
exit "$status"

#!/usr/bin/env bash
# The demo: the whole loop end to end on this machine (local control plane, ADO + Entra simulator,
# controller, node harness, agent entrypoint over the stand-in agent). See README.md.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/tests/setup.sh"
echo "[demo] starting the local Kubernetes control plane (the first run builds it from Go modules: ~10 min)" >&2
up_log="$repo/.cache/demo-cluster.log"
"$repo/tests/cluster/up.sh" >/dev/null 2>"$up_log" || { cat "$up_log" >&2; exit 1; }
if ! grep -q "already running" "$up_log"; then
  trap '"$repo/tests/cluster/down.sh"' EXIT
fi
export KUBECONFIG="${AZP_CLUSTER_DIR:-$repo/.cache/cluster}/kubeconfig"
echo "[demo] building azp-autoscaler and the test bed" >&2
cargo build --quiet --workspace --bins
AZP_BED_LOG=${AZP_BED_LOG:-info} "$repo/target/debug/azp-testbed" demo

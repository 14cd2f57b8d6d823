#!/usr/bin/env bash
# The whole test suite: unit, property, integration (real libp2p swarms on loopback, real RocksDB),
# end-to-end (real `meshchat` processes). Installs missing system packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
. scripts/env.sh
. scripts/disk-guard.sh
cargo test --workspace --locked "$@"

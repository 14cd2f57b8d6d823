#!/usr/bin/env bash
# Builds meshchat and runs `meshchat demo`: a small mesh on this machine (a home server and a few
# users, real nodes on loopback) showing 1:1, offline and group messages with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
. scripts/env.sh
. scripts/disk-guard.sh
cargo build --release --locked -p meshchat
exec "$CARGO_TARGET_DIR/release/meshchat" demo "$@"

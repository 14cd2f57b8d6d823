#!/usr/bin/env bash
# Keeps the shared build directory from filling the disk. A full disk does not fail cleanly: the
# linker dies with SIGBUS half-way through writing a test binary. Sourced after scripts/env.sh.
# Below MESHCHAT_MIN_FREE_GB (default 12) free on the build directory's filesystem it drops the
# incremental caches, then the stale debug artifacts (a cold rebuild costs ~20-30 minutes; a
# full disk costs the whole run).
free_gb() {
  mkdir -p "$CARGO_TARGET_DIR"
  df -Pk "$CARGO_TARGET_DIR" | awk 'NR==2 { print int($4 / 1048576) }'
}
min="${MESHCHAT_MIN_FREE_GB:-12}"
if [ "$(free_gb)" -lt "$min" ]; then
  echo "disk-guard: under ${min} GB free; removing incremental caches in $CARGO_TARGET_DIR" >&2
  rm -rf "$CARGO_TARGET_DIR"/*/incremental
fi
if [ "$(free_gb)" -lt "$min" ]; then
  echo "disk-guard: still under ${min} GB free; removing $CARGO_TARGET_DIR/debug (cold rebuild)" >&2
  rm -rf "$CARGO_TARGET_DIR/debug"
fi
if [ "$(free_gb)" -lt 4 ]; then
  echo "disk-guard: only $(free_gb) GB free on the disk holding $CARGO_TARGET_DIR; the build needs ~15 GB." >&2
  echo "free some space (or set CARGO_TARGET_DIR elsewhere) and run again." >&2
  exit 1
fi

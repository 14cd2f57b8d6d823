#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 20), seeding the corpora with the known-answer
# vectors of docs/test-vectors.md. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks the nightly flags the sanitizer needs.
# Usage: fuzz/run-all.sh [SECONDS] [TARGET...]
set -euo pipefail

secs="${1:-20}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
vectors="$root/docs/test-vectors.md"

export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
# A separate target dir, so the sanitizer flags do not invalidate the shared build.
export CARGO_TARGET_DIR="${MESHCHAT_FUZZ_TARGET_DIR:-/root/.cache/meshchat-fuzz-target}"

# vector NAME: the hex value of NAME in docs/test-vectors.md.
vector() {
  awk -v k="$1 = " 'index($0, k) == 1 { print substr($0, length(k) + 1) }' "$vectors"
}
# seed TARGET FILE HEX...: write the concatenated bytes to the target's corpus.
seed() {
  local target="$1" file="$2"
  shift 2
  mkdir -p "$here/corpus/$target"
  printf '%s' "$@" | xxd -r -p > "$here/corpus/$target/$file"
}

bundle="$(vector 'bundle(bob).wire')"
bundle_key="$(vector 'bundle_record_key(bob)')"
presence="$(vector 'presence_record(seq 1, expires now+3600).wire')"
presence_key="$(vector 'presence_keys(pair, alice, epoch).dht_key')"
envelope="$(vector 'envelope(alice -> bob, content above).wire')"
pair_envelope="$(vector 'pair_envelope(alice -> bob, content above).wire')"
content="$(vector 'content(text "hello, bob").wire')"
if [[ -n "$bundle" && -n "$presence" && -n "$envelope" && -n "$content" ]]; then
  seed prekey_bundle vector-bundle "$bundle"
  seed envelope vector-envelope "$envelope"
  [[ -n "$pair_envelope" ]] && seed envelope vector-pair-envelope "$pair_envelope"
  seed content vector-content "$content"
  seed presence vector-record "$presence"
  seed validate_record vector-bundle 21 "$bundle_key" "$bundle"
  seed validate_record vector-presence 21 "$presence_key" "$presence"
  seed validate_record derived-bundle 80 "$bundle"
  seed validate_record derived-presence 81 "$presence"
  mkdir -p "$here/corpus/identity"
  printf '%s' "$(vector 'alice.user_id')" > "$here/corpus/identity/user-id"
  printf '%s' "$(vector 'alice.recovery_phrase')" > "$here/corpus/identity/phrase"
else
  echo "warning: could not read vectors from $vectors; starting with empty corpora" >&2
fi

cd "$root"
if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir "$here")
fi

failed=()
for t in "${targets[@]}"; do
  echo "=== fuzzing $t for ${secs}s"
  mkdir -p "$here/corpus/$t"
  if ! cargo fuzz run --fuzz-dir "$here" --target-dir "$CARGO_TARGET_DIR" "$t" "$here/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=70000 -print_final_stats=1; then
    failed+=("$t")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]} (crashing inputs are in fuzz/artifacts/)" >&2
  exit 1
fi
echo "all ${#targets[@]} targets ran ${secs}s without a crash"

# Sourced by the scripts: one warm build directory outside the checkout, shared by every clone on
# this machine (RocksDB's C++ build alone takes ~10-20 minutes cold on 2 cores).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meshchat-target}"
# No incremental caches: they grew to 22 GB and bought CI nothing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# ccache in front of the C/C++ compiler: RocksDB's C++ is rebuilt whenever the build script's
# host dependencies change features (e.g. `cargo test -p X` vs `--workspace`); with ccache that
# costs seconds, not minutes. Used only when installed (scripts/ensure-deps.sh installs it).
if command -v ccache >/dev/null 2>&1; then
  export CC="${CC:-ccache cc}"
  export CXX="${CXX:-ccache c++}"
fi

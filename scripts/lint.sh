#!/usr/bin/env bash
# `make lint`: formatting, clippy over the whole workspace (every target, -D warnings; the lints
# are [workspace.lints] in Cargo.toml and clippy.toml) and the dependency checks.
#
#   scripts/lint.sh          everything
#   scripts/lint.sh deps     only the dependency checks (`make test` runs these first): unused
#                            dependencies (cargo-machete) and banned crates, licenses and sources
#                            (cargo-deny, deny.toml). Both take about a second once installed.
#
# The two tools are installed once, at the pinned versions below, with `cargo install --locked`
# (a few minutes of compiling on a new machine), like scripts/test.sh installs cargo-nextest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
CARGO=${CARGO:-cargo}

MACHETE_VERSION=0.9.2
DENY_VERSION=0.20.2

# tool SUBCOMMAND VERSION: installs cargo-SUBCOMMAND at VERSION unless that version is there.
# (Asked through cargo: run directly with CARGO set, cargo-machete takes --version for a path.)
tool() {
    local sub=$1 version=$2 have
    have=$("$CARGO" "$sub" --version 2>/dev/null || true)
    if [[ " $have " != *" $version "* ]]; then
        echo "lint: installing cargo-$sub $version"
        "$CARGO" install --locked "cargo-$sub" --version "$version"
    fi
}

# deps [LOG_LEVEL]: cargo-deny at `warn` also lists duplicated crates (deny.toml reports them
# without failing); `make test` asks only for errors.
deps() {
    local level=${1:-warn}
    tool machete "$MACHETE_VERSION"
    tool deny "$DENY_VERSION"
    echo "lint: unused dependencies (cargo machete)"
    "$CARGO" machete --skip-target-dir
    # Advisories are left out: their database comes from the network.
    echo "lint: banned crates, licenses, sources (cargo deny)"
    "$CARGO" deny --log-level "$level" check --hide-inclusion-graph bans licenses sources
}

case ${1:-all} in
    deps) deps error ;;
    all)
        echo "lint: formatting (cargo fmt --check)"
        "$CARGO" fmt --all -- --check
        echo "lint: clippy (workspace, all targets, -D warnings)"
        "$CARGO" clippy --workspace --all-targets -- -D warnings
        deps
        ;;
    *)
        echo "usage: scripts/lint.sh [deps]" >&2
        exit 2
        ;;
esac

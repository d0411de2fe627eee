#!/usr/bin/env bash
# make fuzz: the fuzz targets under fuzz/ (cargo-fuzz, libFuzzer, the nightly toolchain), each
# run for FUZZ_SECONDS (default 60) over the committed seeds in fuzz/corpus/<target>. New
# inputs libFuzzer finds go to target/fuzz-corpus/<target> and crashes to
# target/fuzz-artifacts/<target>/, not into the repository: a crash is fixed with a regression
# test in the crate, and its input may then be added to fuzz/corpus by hand.
#
# No sanitizer (-s none): the platform's own code forbids unsafe, so AddressSanitizer would
# slow every execution several times over to watch memory the compiler already checks; the C
# library it links (librdkafka) is not reached by these targets.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-60}"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(envelope condition)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
FUZZ_VERSION=0.13.2
if [[ " $(cargo fuzz --version 2>/dev/null || true) " != *" $FUZZ_VERSION "* ]]; then
    echo "fuzz: installing cargo-fuzz $FUZZ_VERSION"
    cargo install --locked cargo-fuzz --version "$FUZZ_VERSION"
fi

for t in "${targets[@]}"; do
    mkdir -p "target/fuzz-corpus/$t" "target/fuzz-artifacts/$t"
    echo "fuzz: $t for ${secs}s"
    cargo +nightly fuzz run --fuzz-dir fuzz -s none "$t" \
        "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="target/fuzz-artifacts/$t/" -print_final_stats=1
done

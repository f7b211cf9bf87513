#!/usr/bin/env bash
# Times the reachable-code judgement of 32-bit ARM binaries against the linear scan it replaced (issue 19), side by
# side, with examples/arm-code-bench.rs (release build). Default: flotilla's own ARMv6 build from dist/
# (`packaging/build armv6`), then every binary of the check-binary corpus that exists.
#
# usage: bench/arm-code.sh [FILE...]     ITERATIONS=20 by default
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    dist=${FLOTILLA_ARM_DIST:-$root/dist}
    [ -f "$dist/flotilla-arm-unknown-linux-gnueabi" ] && files+=("$dist/flotilla-arm-unknown-linux-gnueabi")
    for f in target/test-fixtures/busybox/armel/busybox target/test-fixtures/busybox/armhf/busybox \
        target/test-fixtures/corpus/ring-probe-arm-unknown-linux-gnueabi.stripped; do
        [ -f "$f" ] && files+=("$f")
    done
fi
[ ${#files[@]} -gt 0 ] || { echo "bench/arm-code.sh: no binaries (run packaging/build armv6 or tests/setup)" >&2; exit 1; }
cargo build --quiet --release --example arm-code-bench
for f in "${files[@]}"; do
    "${CARGO_TARGET_DIR:-$root/target}/release/examples/arm-code-bench" "$f" "${ITERATIONS:-20}"
done

#!/usr/bin/env bash
# Sets up the machine and runs every check CI runs: formatting, lints, and all tests (unit,
# property tests against the brute-force oracle, end-to-end tests on real qcow2 chains).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --live
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests in tests/ drive the built binary.
cargo build --workspace --bins
# The demo test runs the README's first command, scripts/demo.sh, which builds the release
# binary (built here, so that it is not built inside a test).
cargo build --release -p diskchain
cargo test --workspace

#!/usr/bin/env bash
# Fuzzes the CSV reader for a while (default 60 s): installs cargo-fuzz if missing and runs libFuzzer against
# fuzz_targets/csv_import.rs, seeded with fuzz/seeds. cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets
# the stable toolchain accept them. Usage: fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
corpus=fuzz/corpus/csv_import
mkdir -p "$corpus"
cp fuzz/seeds/*.csv "$corpus"/
RUSTC_BOOTSTRAP=1 cargo fuzz run csv_import "$corpus" -- -max_total_time="$seconds" -max_len=4096

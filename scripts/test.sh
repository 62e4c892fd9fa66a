#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy with warnings denied, and all tests (which start
# their own redis-server and PostgreSQL on loopback ports). Installs redis-server, openssl (for
# the TLS test), postgresql (for the school ERP demo's test) and nodejs (for the test that runs
# the README's Node snippet against Redis) with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# redis-cli (package redis-tools, which redis-server depends on) builds the test clusters.
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
# PostgreSQL for the school ERP demo's test (tests/school_erp), which starts its own server.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q "${need[@]}"
fi
redis-server --version
node --version
ls -d /usr/lib/postgresql/*/bin | tail -1

# A one-off build gains nothing from incremental compilation's cache, which would add gigabytes
# to target/ on a machine whose disk may be small.
export CARGO_INCREMENTAL=0
df -h . | tail -1

cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features
du -sh target 2>/dev/null || true

#!/usr/bin/env bash
# Puts the offline RustSec snapshot (../shared/advisory-db) where cargo-deny looks for a fetched
# copy of the default database: target/advisory-dbs/advisory-db-3157b0e258782691, a git
# repository with one commit. Done once per snapshot; `cargo deny --offline` then reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${ADVISORY_DB:-../shared/advisory-db}
dst=target/advisory-dbs/advisory-db-3157b0e258782691
[ -d "$src" ] || { echo "advisory-db: no snapshot at $src" >&2; exit 1; }
stamp=$(find "$src" -type f -newer "$dst/.git/HEAD" 2>/dev/null | head -n 1 || true)
if [ -d "$dst/.git" ] && [ -z "$stamp" ]; then
  exit 0
fi
rm -rf "$dst"
mkdir -p "$dst"
cp -r "$src"/. "$dst"/
git -C "$dst" init -q
git -C "$dst" add -A
git -C "$dst" -c user.name=tollgate -c user.email=tollgate@localhost commit -qm snapshot
echo "advisory-db: snapshot of $(find "$dst/crates" -name '*.md' | wc -l) advisories in $dst"

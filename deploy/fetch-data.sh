#!/usr/bin/env bash
# Puts real example sequences under data/ (git-ignored), from two Debian example-data packages:
#   lastz-examples   (usr/share/doc/lastz/examples/test_data/pseudo{cat,pig2}.fa.gz)
#       data/pseudocat.fa, data/pseudopig2.fa     about 19 and 23 kbp: a small real pair
#   sibelia-examples (usr/share/doc/sibelia/examples/Sibelia/Helicobacter_pylori/
#                     Helicobacter_pylori.fasta.gz, two genomes in one file, split here)
#       data/hpylori_a.fa  (NC_017366.1, H. pylori F32)          about 1.58 Mbp
#       data/hpylori_b.fa  (NC_017371.1, H. pylori Gambia94/24)  about 1.71 Mbp
# The packages are unpacked (dpkg -x) into data/pkg/. Safe to run again: whatever is already
# there is kept. Needs apt-get (Debian/Ubuntu) and network access; root only if the apt lists
# are missing. DATA_DIR overrides the target folder.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${DATA_DIR:-$repo/data}"
pkg="$data/pkg"
lastz_dir="$pkg/usr/share/doc/lastz/examples/test_data"
hpylori_gz="$pkg/usr/share/doc/sibelia/examples/Sibelia/Helicobacter_pylori/Helicobacter_pylori.fasta.gz"
packages=(lastz-examples sibelia-examples)

outputs=(pseudocat.fa pseudopig2.fa hpylori_a.fa hpylori_b.fa)

all_there() {
  local f
  for f in "${outputs[@]}"; do [ -s "$data/$f" ] || return 1; done
}

fetch_packages() {
  command -v apt-get >/dev/null || { echo "fetch-data: apt-get not found (needs Debian/Ubuntu)" >&2; exit 1; }
  if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "fetch-data: apt does not know ${packages[*]}; run 'sudo apt-get update' and try again" >&2
      exit 1
    fi
    echo "fetch-data: apt lists missing, running apt-get update"
    apt-get update -qq
  fi
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  # apt drops privileges to _apt for downloads; let it write there (avoids the sandbox warning).
  if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
  (cd "$tmp" && apt-get download -q "${packages[@]}")
  mkdir -p "$pkg"
  local deb
  for deb in "$tmp"/*.deb; do
    echo "fetch-data: unpacking $(basename "$deb") into ${pkg#"$repo"/}"
    dpkg -x "$deb" "$pkg"
  done
}

# Decompress $1 into $2 through a temporary file, so an interrupted run leaves no half file.
gunzip_to() {
  gzip -dc "$1" > "$2.tmp"
  mv "$2.tmp" "$2"
}

# Record number $2 (1-based) of the gzipped multi-FASTA $1 into $3.
record_to() {
  gzip -dc "$1" | awk -v want="$2" '/^>/ { n++ } n == want' > "$3.tmp"
  [ -s "$3.tmp" ] || { echo "fetch-data: $1 has no record $2" >&2; rm -f "$3.tmp"; exit 1; }
  mv "$3.tmp" "$3"
}

mkdir -p "$data"
if ! all_there; then
  if [ ! -f "$lastz_dir/pseudocat.fa.gz" ] || [ ! -f "$lastz_dir/pseudopig2.fa.gz" ] \
     || [ ! -f "$hpylori_gz" ]; then
    fetch_packages
  fi
  [ -s "$data/pseudocat.fa" ] || gunzip_to "$lastz_dir/pseudocat.fa.gz" "$data/pseudocat.fa"
  [ -s "$data/pseudopig2.fa" ] || gunzip_to "$lastz_dir/pseudopig2.fa.gz" "$data/pseudopig2.fa"
  [ -s "$data/hpylori_a.fa" ] || record_to "$hpylori_gz" 1 "$data/hpylori_a.fa"
  [ -s "$data/hpylori_b.fa" ] || record_to "$hpylori_gz" 2 "$data/hpylori_b.fa"
fi

for f in "${outputs[@]}"; do
  # name (first header word), letters (without headers and line breaks), file
  awk -v file="${data#"$repo"/}/$f" '
    /^>/ { if (!name) { name = substr($0, 2); sub(/^[ \t]+/, "", name); sub(/[ \t].*/, "", name) } next }
    { gsub(/[ \t\r]/, ""); n += length($0) }
    END { printf "%-24s %10d bp  %s\n", file, n, name }' "$data/$f"
done

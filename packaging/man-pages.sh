#!/usr/bin/env bash
# Writes tally's manual pages, gzipped, under ROOT/usr/share/man/man{1,5,8}: what the built
# binaries' hidden `man` subcommand generates from their clap definitions (tally(1),
# tally-publisher(1), tallyd(8) and a page per subcommand) and from packaging/tallyd.toml
# (tallyd.toml(5)). Both packages call it, so they ship the same pages.
#
#   packaging/man-pages.sh BINDIR ROOT
set -euo pipefail
bin="$1"
root="$2"
pages="$(mktemp -d)"
trap 'rm -rf "$pages"' EXIT
for b in tallyd tally tally-publisher; do
    "$bin/$b" man --out "$pages" >/dev/null
done
for page in "$pages"/*; do
    dir="$root/usr/share/man/man${page##*.}"
    install -d -m 0755 "$dir"
    # -n: no name or time stamp in the archive, so a rebuild gives the same bytes.
    gzip -9n < "$page" > "$dir/${page##*/}.gz"
    chmod 0644 "$dir/${page##*/}.gz"
done

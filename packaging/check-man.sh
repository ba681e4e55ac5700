#!/usr/bin/env bash
# Checks that every manual page under DIR (recursively, *.gz) renders without a warning:
# groff's strict check (-ww) and man-db's `man -l`, each with nothing on stderr. Prints
# how many pages it checked.
#
#   packaging/check-man.sh DIR
set -euo pipefail
count=0
while IFS= read -r -d '' page; do
    warnings="$(zcat "$page" | groff -ww -z -man 2>&1 >/dev/null)"
    warnings+="$(LC_ALL=C.UTF-8 MANWIDTH=80 man -l "$page" 2>&1 >/dev/null)"
    if [ -n "$warnings" ]; then
        echo "$page does not render cleanly:"
        echo "$warnings"
        exit 1
    fi
    count=$((count + 1))
done < <(find "$1" -name '*.gz' -print0)
[ "$count" -gt 0 ] || { echo "no manual pages under $1"; exit 1; }
echo "$count manual pages render"

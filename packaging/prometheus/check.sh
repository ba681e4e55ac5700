#!/usr/bin/env bash
# Checks the Prometheus files shipped with tally: the alert rules parse
# (`promtool check rules`), their unit tests pass (`promtool test rules`), and every
# query of the Grafana dashboard parses as PromQL (each, with Grafana's variables
# replaced, checked as a recording rule). Installs nothing: promtool comes with
# Debian's `prometheus` package (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null; then
    echo "check.sh: promtool not found (apt-get install prometheus)" >&2
    exit 69
fi

promtool check rules tally-alerts.yml
promtool test rules tally-alerts.test.yml

# The dashboard's queries: one "expr" per line in the JSON (as it is written), JSON's
# \" unescaped, Grafana's variables replaced by what PromQL accepts.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
{
    printf 'groups:\n  - name: tally-dashboard-queries\n    rules:\n'
    grep -o '"expr": ".*"' tally-dashboard.json |
        sed -e 's/^"expr": "//' -e 's/"$//' -e 's/\\"/"/g' \
            -e 's/\$__rate_interval/5m/g' -e 's/\$job/.*/g' -e 's/\$instance/.*/g' |
        awk "{ gsub(/'/, \"''\"); printf \"      - record: dashboard:query%d\\n        expr: '%s'\\n\", NR, \$0 }"
} >"$scratch/dashboard-queries.yml"
queries=$(grep -c 'record:' "$scratch/dashboard-queries.yml" || true)
if [ "$queries" -lt 1 ]; then
    echo "check.sh: no query found in tally-dashboard.json" >&2
    exit 65
fi
promtool check rules "$scratch/dashboard-queries.yml"
echo "check.sh: alert rules, their tests and $queries dashboard queries are fine"

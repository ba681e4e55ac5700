#!/usr/bin/env bash
# Installs what both packages (build-deb.sh, build-rpm.sh) ship into a staging root:
# tallyd, tally and tally-publisher, the systemd unit (into UNITDIR: /lib/systemd/system
# for Debian, /usr/lib/systemd/system for RHEL), /etc/tally/tallyd.toml pointed at the
# packaged paths, /etc/tally/bundles, the docs and example policy, the Prometheus alert
# rules and Grafana dashboard (/usr/share/tally) and the manual pages.
#
#   packaging/stage.sh BINDIR STAGE UNITDIR
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$1"
stage="$2"
unitdir="$3"
install -d -m 0755 "$stage/usr/bin" "$stage$unitdir" "$stage/etc/tally/bundles" \
    "$stage/usr/share/doc/tally/examples" "$stage/usr/share/tally"
install -m 0755 "$bin/tallyd" "$bin/tally" "$bin/tally-publisher" "$stage/usr/bin/"
install -m 0644 packaging/tallyd.service "$stage$unitdir/tallyd.service"
install -m 0644 packaging/tallyd.toml "$stage/etc/tally/tallyd.toml"
install -m 0644 packaging/policy.example.toml "$stage/usr/share/doc/tally/examples/policy.toml"
install -m 0644 README.md ARCHITECTURE.md "$stage/usr/share/doc/tally/"
install -m 0644 client/include/tally.h "$stage/usr/share/doc/tally/examples/tally.h"
install -m 0644 packaging/prometheus/tally-alerts.yml packaging/prometheus/tally-dashboard.json \
    "$stage/usr/share/tally/"

# The packaged config points at the packaged paths and a vendor key the admin installs.
sed -i \
    -e 's|^vendor_keys = \[\]|vendor_keys = ["/etc/tally/vendor.pub"]|' \
    -e 's|^# report_dir = .*|report_dir = "/var/lib/tally/reports"|' \
    "$stage/etc/tally/tallyd.toml"

bash packaging/man-pages.sh "$bin" "$stage"

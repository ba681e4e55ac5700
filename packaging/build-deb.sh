#!/usr/bin/env bash
# Builds the Debian package of tally: tallyd, tally and tally-publisher, the systemd unit,
# /etc/tally/tallyd.toml (a conffile), the example policy, and the Prometheus alert rules
# and Grafana dashboard (/usr/share/tally), and the manual pages (packaging/stage.sh).
#
#   packaging/build-deb.sh [release|debug] [OUT.deb]
#
# "debug" packages the binaries `cargo test` already built (CI checks the packaging
# without a release build); "release" (the default) builds optimised binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
version="$(grep -m1 '^version = ' Cargo.toml | cut -d'"' -f2)"
arch="$(dpkg --print-architecture)"
out="${2:-target/tally_${version}_${arch}.deb}"

if [ "$profile" = release ]; then
    cargo build --release -p tally-daemon -p tally-client -p tally-publisher
else
    # The same feature set as `cargo test --workspace`, so nothing is rebuilt after tests.
    cargo build --workspace --all-targets
fi
# Cargo puts the binaries in CARGO_TARGET_DIR when it is set.
bin="${CARGO_TARGET_DIR:-target}/$profile"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
install -d "$stage/DEBIAN"
bash packaging/stage.sh "$bin" "$stage" /lib/systemd/system

cat > "$stage/DEBIAN/control" <<CONTROL
Package: tally
Version: ${version}
Architecture: ${arch}
Maintainer: tally developers <tally@localhost>
Section: net
Priority: optional
Depends: adduser
Description: on-premises floating license server
 tallyd serves concurrent (counted) software licenses over QUIC from a
 vendor-signed entitlement bundle, keeps seats in a crash-safe store and writes
 signed usage reports. tally is the command-line client; tally-publisher the
 vendor's tool.
CONTROL
echo /etc/tally/tallyd.toml > "$stage/DEBIAN/conffiles"

cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    install -d -m 0700 /var/lib/tally
    if ! getent passwd tally >/dev/null; then
        adduser --system --group --home /var/lib/tally --no-create-home tally >/dev/null
    fi
    chown tally:tally /var/lib/tally
    # The server identity and admin token, once; never replaced on upgrade.
    if [ ! -e /var/lib/tally/server.key ]; then
        runuser -u tally -- /usr/bin/tallyd init --data-dir /var/lib/tally
        echo "tally: send an activation request to your vendor:"
        echo "  tallyd request --config /etc/tally/tallyd.toml --out activation.req"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        systemctl enable tallyd.service >/dev/null || true
    fi
fi
exit 0
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop tallyd.service >/dev/null || true
fi
exit 0
PRERM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"

mkdir -p "$(dirname "$out")"
dpkg-deb --root-owner-group --build "$stage" "$out" >/dev/null
echo "$out"

#!/usr/bin/env bash
# CI's packaging check: build the .deb from the test binaries, check what it holds,
# install it with dpkg -i, verify the unit, and run the installed tallyd from its
# packaged configuration without systemd. Needs root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
deb="$(bash packaging/build-deb.sh debug target/tally-ci.deb)"
dpkg-deb -c "$deb" > target/deb-contents.txt
for f in ./usr/bin/tallyd ./usr/bin/tally ./usr/bin/tally-publisher \
         ./lib/systemd/system/tallyd.service ./etc/tally/tallyd.toml \
         ./usr/share/doc/tally/examples/policy.toml \
         ./usr/share/tally/tally-alerts.yml ./usr/share/tally/tally-dashboard.json \
         ./usr/share/man/man8/tallyd.8.gz ./usr/share/man/man8/tallyd-run.8.gz \
         ./usr/share/man/man5/tallyd.toml.5.gz ./usr/share/man/man1/tally.1.gz \
         ./usr/share/man/man1/tally-run.1.gz ./usr/share/man/man1/tally-publisher.1.gz; do
    grep -q " $f\$" target/deb-contents.txt || { echo "package lacks $f"; exit 1; }
done
# The manual pages render without a warning (from the package's files: a minimal image
# may exclude /usr/share/man from what dpkg installs).
unpacked="$(mktemp -d)"
dpkg-deb -x "$deb" "$unpacked"
bash packaging/check-man.sh "$unpacked/usr/share/man"
rm -rf "$unpacked"
test "$(dpkg-deb -f "$deb" Package)" = tally

command -v adduser >/dev/null || { apt-get update -qq && apt-get install -y -qq adduser; }
dpkg -i "$deb"
test "$(stat -c '%a %U' /var/lib/tally/server.key)" = "600 tally"
test "$(stat -c '%a %U' /var/lib/tally/admin.token)" = "600 tally"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /lib/systemd/system/tallyd.service
fi

# A site from activation to a served seat, with the installed binaries and config.
work="$(mktemp -d)"
chmod 1777 "$work"
pid=""
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
runuser -u tally -- tallyd request --config /etc/tally/tallyd.toml --out "$work/activation.req"
tally-publisher keygen --out "$work/vendor" >/dev/null
cp "$work/vendor.pub" /etc/tally/vendor.pub
cat > "$work/spec.toml" <<SPEC
vendor = "CI"
[customer]
id = "ci"
name = "CI site"
[[feature]]
name = "solver"
seats = 2
SPEC
tally-publisher issue --vendor-key "$work/vendor.key" --spec "$work/spec.toml" \
    --request "$work/activation.req" --out "$work/ci.bundle" >/dev/null
# A machine that ran this check before keeps its server key; the earlier CI bundle was
# signed by an earlier CI vendor key and goes.
rm -f /etc/tally/bundles/ci.bundle
install -m 0644 "$work/ci.bundle" /etc/tally/bundles/ci.bundle
runuser -u tally -- tallyd check-config --config /etc/tally/tallyd.toml
runuser -u tally -- tallyd run --config /etc/tally/tallyd.toml > "$work/tallyd.out" 2>&1 &
pid=$!
for _ in $(seq 1 50); do
    if tally --server 127.0.0.1:27300 --vendor-pub /etc/tally/vendor.pub run solver -- true 2>/dev/null; then
        echo "packaging check: installed tallyd served a seat"
        exit 0
    fi
    sleep 0.2
done
cat "$work/tallyd.out"
echo "the installed tallyd did not serve"
exit 1

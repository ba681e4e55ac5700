#!/usr/bin/env bash
# Builds the RPM of tally (RHEL, Rocky, Alma, Fedora) with the files of the .deb
# (packaging/stage.sh): the three binaries, the hardened unit in /usr/lib/systemd/system,
# /etc/tally/tallyd.toml (%config(noreplace): an upgrade keeps the admin's edits and
# writes the new file as .rpmnew), the `tally` user (sysusers.d), /var/lib/tally 0700,
# the manual pages, and scriptlets that run `tallyd init` once and never replace a key.
#
#   packaging/build-rpm.sh [release|debug] [OUT.rpm]
#
# "debug" packages the binaries `cargo test` already built (CI); "release" (the default)
# builds optimised binaries first. rpmbuild compiles nothing: it packages the binaries
# built here. TALLY_RPM_RELEASE sets the package's release (default 1; CI's upgrade test
# builds a 2). Needs rpmbuild (Debian: apt-get install rpm; RHEL: rpm-build).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
version="$(grep -m1 '^version = ' Cargo.toml | cut -d'"' -f2)"
release="${TALLY_RPM_RELEASE:-1}"
arch="$(uname -m)"
out="${2:-target/tally-${version}-${release}.${arch}.rpm}"

if [ "$profile" = release ]; then
    cargo build --release -p tally-daemon -p tally-client -p tally-publisher
else
    # The same feature set as `cargo test --workspace`, so nothing is rebuilt after tests.
    cargo build --workspace --all-targets
fi
# Cargo puts the binaries in CARGO_TARGET_DIR when it is set.
bin="${CARGO_TARGET_DIR:-target}/$profile"
# Smallest for a release; fast for CI's debug binaries (hundreds of MB of debug info).
if [ "$profile" = release ]; then zstd_level=19; else zstd_level=3; fi

top="$(mktemp -d)"
trap 'rm -rf "$top"' EXIT
stage="$top/stage"
bash packaging/stage.sh "$bin" "$stage" /usr/lib/systemd/system
install -d -m 0755 "$stage/usr/lib/sysusers.d" "$stage/var/lib/tally"
# The system user, for systemd-sysusers (and %pre, which creates it before the files
# owned by it are unpacked).
sysusers='u tally - "tally license server" /var/lib/tally'
echo "$sysusers" > "$stage/usr/lib/sysusers.d/tally.conf"
chmod 0644 "$stage/usr/lib/sysusers.d/tally.conf"

mkdir -p "$top/SPECS"
cat > "$top/SPECS/tally.spec" <<SPEC
# Prebuilt binaries: no debuginfo package, no build-id links (they would clash with other
# packages' links of the same binaries), and no post-install step (no stripping, so the
# binaries are those of the .deb; the manual pages are compressed already).
%define _build_id_links none
%define debug_package %{nil}
%define __os_install_post %{nil}
# zstd, as Fedora and RHEL 8 and later compress theirs; level ${zstd_level}.
%define _binary_payload w${zstd_level}T.zstdio

Name:           tally
Version:        ${version}
Release:        ${release}
Summary:        On-premises floating license server
License:        Apache-2.0
# %pre creates the user with systemd-sysusers or, without it, useradd; %post runs
# tallyd init as that user.
Requires(pre):  shadow-utils
Requires(post): util-linux

%description
tallyd serves concurrent (counted) software licenses over QUIC from a
vendor-signed entitlement bundle, keeps seats in a crash-safe store and writes
signed usage reports. tally is the command-line client; tally-publisher the
vendor's tool.

%install
cp -a ${stage}/. %{buildroot}/

%pre
# The tally user, before the files it owns are unpacked.
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo '${sysusers}' | systemd-sysusers --replace=/usr/lib/sysusers.d/tally.conf - || :
fi
if ! getent passwd tally >/dev/null; then
    getent group tally >/dev/null || groupadd -r tally
    useradd -r -g tally -d /var/lib/tally -s /sbin/nologin -c "tally license server" tally
fi

%post
# \$1 is 1 on install, 2 on upgrade. The server identity and admin token, once; never
# replaced on upgrade (the key names this server in the vendor's bundle).
chown tally:tally /var/lib/tally
chmod 0700 /var/lib/tally
if [ ! -e /var/lib/tally/server.key ]; then
    runuser -u tally -- /usr/bin/tallyd init --data-dir /var/lib/tally
    echo "tally: send an activation request to your vendor:"
    echo "  tallyd request --config /etc/tally/tallyd.toml --out activation.req"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # As %systemd_post: the preset decides on a first install (the admin enables it).
    if [ "\$1" -eq 1 ]; then
        systemctl preset tallyd.service >/dev/null 2>&1 || :
    fi
fi
exit 0

%preun
# \$1 is 0 when the package goes (not on upgrade): stop and disable the service.
if [ "\$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now tallyd.service >/dev/null 2>&1 || :
fi
exit 0

%postun
# On upgrade (\$1 >= 1) a running tallyd restarts on the new binary; leases are in the store.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "\$1" -ge 1 ]; then
        systemctl try-restart tallyd.service >/dev/null 2>&1 || :
    fi
fi
exit 0

%files
%defattr(-,root,root,-)
/usr/bin/tallyd
/usr/bin/tally
/usr/bin/tally-publisher
/usr/lib/systemd/system/tallyd.service
/usr/lib/sysusers.d/tally.conf
%dir /etc/tally
%config(noreplace) /etc/tally/tallyd.toml
%dir /etc/tally/bundles
%dir %attr(0700,tally,tally) /var/lib/tally
/usr/share/man/man1/*
/usr/share/man/man5/*
/usr/share/man/man8/*
/usr/share/tally
%dir /usr/share/doc/tally
%doc /usr/share/doc/tally/README.md
%doc /usr/share/doc/tally/ARCHITECTURE.md
%doc /usr/share/doc/tally/examples
SPEC

rpmbuild --quiet -bb \
    --define "_topdir $top" \
    --define "_rpmdir $top/RPMS" \
    --define "_build_name_fmt tally.rpm" \
    "$top/SPECS/tally.spec"
mkdir -p "$(dirname "$out")"
cp "$top/RPMS/tally.rpm" "$out"
echo "$out"

#!/usr/bin/env bash
# CI's RPM check, with Debian's rpm tools: build the RPM from the test binaries, check its
# files, conffile flag, owners, scriptlets and dependencies; install it into a scratch
# root (`rpm --root`, no scriptlets: they need a whole OS in the root) and check modes;
# upgrade it there to a second build and check that the edited config and the data dir
# stay; run its %pre and %post on this machine with /var/lib/tally on a tmpfs (a mount
# namespace of their own) and check that `tallyd init` runs once and the key stays.
# Needs root, unshare and the .deb's check before it (packaging/ci-check.sh: the tally
# user and /usr/bin/tallyd exist).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rpmbuild >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm
fi
version="$(grep -m1 '^version = ' Cargo.toml | cut -d'"' -f2)"
fail() { echo "rpm check: $*"; exit 1; }

SECONDS=0
rpm1="$(bash packaging/build-rpm.sh debug target/tally-ci.rpm)"
echo "rpm check: build-rpm.sh debug took ${SECONDS} s, $(stat -c %s "$rpm1") bytes"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

test "$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE}' "$rpm1")" = "tally $version 1" \
    || fail "name, version or release"
rpm -qpl "$rpm1" > "$work/files"
for f in /usr/bin/tallyd /usr/bin/tally /usr/bin/tally-publisher \
         /usr/lib/systemd/system/tallyd.service /usr/lib/sysusers.d/tally.conf \
         /etc/tally/tallyd.toml /etc/tally/bundles /var/lib/tally \
         /usr/share/doc/tally/examples/policy.toml \
         /usr/share/tally/tally-alerts.yml /usr/share/tally/tally-dashboard.json \
         /usr/share/man/man8/tallyd.8.gz /usr/share/man/man8/tallyd-run.8.gz \
         /usr/share/man/man5/tallyd.toml.5.gz /usr/share/man/man1/tally.1.gz \
         /usr/share/man/man1/tally-run.1.gz /usr/share/man/man1/tally-publisher.1.gz; do
    grep -qx "$f" "$work/files" || fail "the package lacks $f"
done
# No build-id links, no debug files.
! grep -q -e '/\.build-id' -e '/debug/' "$work/files" || fail "build-id or debug files packaged"

# Flags, modes and owners as the package records them: the config is %config(noreplace)
# (flags c and n), the data dir belongs to tally with mode 0700.
rpm -qp --qf '[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILEUSERNAME}:%{FILEGROUPNAME}|%{FILENAMES}\n]' \
    "$rpm1" > "$work/attrs"
grep -qx 'cn|-rw-r--r--|root:root|/etc/tally/tallyd.toml' "$work/attrs" || fail "config flags: $(grep tallyd.toml "$work/attrs")"
grep -qx '|drwx------|tally:tally|/var/lib/tally' "$work/attrs" || fail "data dir: $(grep /var/lib/tally "$work/attrs")"
grep -qx '|-rwxr-xr-x|root:root|/usr/bin/tallyd' "$work/attrs" || fail "tallyd: $(grep bin/tallyd "$work/attrs")"

# The scriptlets: the user first, then `tallyd init` once, the unit stopped on removal.
rpm -qp --scripts "$rpm1" > "$work/scripts"
for s in 'preinstall scriptlet' 'systemd-sysusers --replace=/usr/lib/sysusers.d/tally.conf' \
         'useradd -r -g tally' 'postinstall scriptlet' \
         'runuser -u tally -- /usr/bin/tallyd init --data-dir /var/lib/tally' \
         'preuninstall scriptlet' 'disable --now tallyd.service' 'postuninstall scriptlet'; do
    grep -qF -- "$s" "$work/scripts" || fail "the scriptlets lack: $s"
done

# Dependencies: the C library the binaries link, the tools of the scriptlets; nothing else.
rpm -qpR "$rpm1" > "$work/requires"
for d in 'libc.so.6()(64bit)' shadow-utils util-linux /bin/sh; do
    grep -qxF "$d" "$work/requires" || fail "no dependency on $d"
done
if grep -vE '^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux-[a-z0-9_-]+\.so\.2|rtld\(|rpmlib\(|/bin/sh$|shadow-utils$|util-linux$|config\(tally\) = )' \
    "$work/requires"; then
    fail "unexpected dependencies (above)"
fi

# Into a scratch root, without scriptlets: the files' modes and owners as installed, and
# the pages. The root's passwd has the user %pre would have made (rpm looks owners up
# in the root's own files).
root="$work/root"
mkdir -p "$root/etc"
printf 'root:x:0:0:root:/root:/bin/sh\ntally:x:990:990::/var/lib/tally:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\ntally:x:990:\n' > "$root/etc/group"
rpm --root "$root" --initdb
rpm --root "$root" -i --nodeps --noscripts "$rpm1" 2> "$work/install.err" \
    || { cat "$work/install.err"; fail "rpm -i into a scratch root"; }
mode() { stat -c %a "$root$1"; }
test "$(stat -c '%a %u:%g' "$root/var/lib/tally")" = "700 990:990" \
    || fail "/var/lib/tally is $(stat -c '%a %u:%g' "$root/var/lib/tally")"
test "$(stat -c %u "$root/usr/bin/tallyd")" = 0 || fail "/usr/bin/tallyd is not root's"
for f in /usr/bin/tallyd /usr/bin/tally /usr/bin/tally-publisher; do
    test "$(mode "$f")" = 755 || fail "$f is $(mode "$f")"
done
for f in /etc/tally/tallyd.toml /usr/lib/systemd/system/tallyd.service /usr/lib/sysusers.d/tally.conf; do
    test "$(mode "$f")" = 644 || fail "$f is $(mode "$f")"
done
test "$(mode /etc/tally/bundles)" = 755 || fail "/etc/tally/bundles is $(mode /etc/tally/bundles)"
grep -qx 'vendor_keys = \["/etc/tally/vendor.pub"\]' "$root/etc/tally/tallyd.toml" \
    || fail "the packaged config does not name /etc/tally/vendor.pub"
bash packaging/check-man.sh "$root/usr/share/man"

# An upgrade keeps the admin's edit of the config and the data dir's files.
echo 'status_needs_token = true' >> "$root/etc/tally/tallyd.toml"
edited="$(sha256sum < "$root/etc/tally/tallyd.toml")"
echo "not a key" > "$root/var/lib/tally/server.key"
rpm2="$(TALLY_RPM_RELEASE=2 bash packaging/build-rpm.sh debug target/tally-ci-2.rpm)"
rpm --root "$root" -U --nodeps --noscripts "$rpm2" 2> "$work/upgrade.err" \
    || { cat "$work/upgrade.err"; fail "rpm -U into the scratch root"; }
test "$(rpm --root "$root" -q tally)" = "tally-$version-2.$(uname -m)" || fail "not upgraded"
test "$(sha256sum < "$root/etc/tally/tallyd.toml")" = "$edited" || fail "the upgrade replaced the edited config"
test "$(cat "$root/var/lib/tally/server.key")" = "not a key" || fail "the upgrade touched the data dir"
test "$(mode /var/lib/tally)" = 700 || fail "/var/lib/tally is $(mode /var/lib/tally) after the upgrade"

# The scriptlets themselves, on this machine, with /var/lib/tally an empty tmpfs and the
# unit manager hidden (a mount namespace of their own): %pre makes sure of the user,
# %post (install) runs `tallyd init` as tally, %post (upgrade) keeps the key.
rpm -qp --qf '%{PREIN}' "$rpm1" > "$work/pre.sh"
rpm -qp --qf '%{POSTIN}' "$rpm1" > "$work/post.sh"
sh "$work/pre.sh" || fail "%pre failed"
getent passwd tally >/dev/null || fail "%pre made no tally user"
[ -x /usr/bin/tallyd ] || fail "/usr/bin/tallyd is missing: run packaging/ci-check.sh first"
mkdir -p /var/lib/tally
unshare -m sh -euc '
    root="$1"; work="$2"
    mount --make-rprivate /
    mount -t tmpfs -o mode=0755 tmpfs /var/lib/tally
    mount --bind "$root/usr/bin/tallyd" /usr/bin/tallyd
    if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi
    sh "$work/post.sh" 1 > "$work/post1.out"
    grep -q "send an activation request" "$work/post1.out"
    test "$(stat -c "%a %U" /var/lib/tally)" = "700 tally"
    test "$(stat -c "%a %U" /var/lib/tally/server.key)" = "600 tally"
    test "$(stat -c "%a %U" /var/lib/tally/admin.token)" = "600 tally"
    sha256sum /var/lib/tally/server.key /var/lib/tally/admin.token > "$work/keys"
    sh "$work/post.sh" 2 > "$work/post2.out"
    sha256sum -c --quiet "$work/keys"
    ! grep -q "send an activation request" "$work/post2.out"
' sh "$root" "$work" || fail "%post: $(cat "$work"/post*.out 2>/dev/null)"
echo "rpm check: built, contents, scriptlets and dependencies checked, installed, upgraded, %post ran"

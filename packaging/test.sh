#!/usr/bin/env bash
# The package test: builds the .deb and .rpm packages (of the debug build
# that ./scripts/test made), installs the .deb files with dpkg, checks what
# they put where, runs the installed daemons by hand with certificates from
# the installed `vitals certs` and sees data arrive, upgrades to a package
# with a higher version (edited config and stored data must survive), then
# removes and purges, checking what remains. Checks the units with
# `systemd-analyze verify` and scores them with `systemd-analyze security`.
#
# It installs packages and creates the `vitals` user on this machine, so it
# needs root and runs only when asked: `VITALS_TEST_PACKAGES=1
# ./scripts/test` (what .ci/run does) or `packaging/test.sh` directly.
# Needs dpkg, rpm, systemd-analyze (apt-get install rpm systemd).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
began=$SECONDS

fail() {
    echo "packaging/test.sh: FAILED: $*" >&2
    exit 1
}
step() { echo "==> $*"; }
# check DESCRIPTION COMMAND...: runs COMMAND, fails the test with DESCRIPTION if it fails.
check() {
    local what=$1
    shift
    "$@" || fail "$what"
}

[ "$(id -u)" = 0 ] || fail "must run as root: it installs packages"
for tool in dpkg dpkg-deb dpkg-query rpm systemd-analyze setpriv runuser strip; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install rpm systemd binutils)"
done

# A machine with Vitals installed for real is not a test machine. What a
# killed earlier run left behind carries this marker and is cleaned up.
marker=/etc/vitals/.package-test
for pkg in vitals-agent vitals-collector; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q installed || [ -d /etc/vitals ]; then
        [ -e "$marker" ] || fail "Vitals is installed here (or /etc/vitals exists); run this on a test machine"
    fi
done
cleanup_system() {
    dpkg -P vitals-agent vitals-collector >/dev/null 2>&1 || true
    rm -rf /etc/vitals /var/lib/vitals-agent /var/lib/vitals-collector
}
cleanup_system

work=$(mktemp -d /tmp/vitals-package-test.XXXXXX)
pids=()
on_exit() {
    local rc=$?
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ $rc != 0 ]; then
        for log in "$work"/*.log; do
            [ -e "$log" ] && { echo "--- $log"; tail -n 40 "$log"; }
        done
    fi
    cleanup_system
    rm -rf "$work"
}
trap on_exit EXIT

version=$(cargo pkgid -p vitals-agent | sed 's/.*[#@]//')
next=$(echo "$version" | awk -F. '{ printf "%d.%d.%d", $1, $2, $3 + 1 }')
out=target/packages
rm -f "$out"/*.deb "$out"/*.rpm

step "build packages $version (.deb, .rpm) and $next (.deb, for the upgrade)"
t=$SECONDS
packaging/build.sh --profile dev
packaging/build.sh --profile dev --version "$next" --deb-only
echo "    built in $((SECONDS - t))s"

deb() { echo "$out/${1}_${2}-1_amd64.deb"; }
rpmfile() { echo "$out/${1}-${2}-1.x86_64.rpm"; }

step "rpm -qlpi: files, scriptlets, config files"
for pkg in vitals-agent vitals-collector; do
    f=$(rpmfile "$pkg" "$version")
    listing=$(rpm -qlpi "$f")
    conf=/etc/vitals/${pkg#vitals-}.toml
    want=("/usr/bin/$pkg" "/usr/lib/systemd/system/$pkg.service" "$conf"
        "/usr/lib/$pkg/maint" "/usr/lib/sysusers.d/$pkg.conf" "/usr/share/doc/$pkg/INSTALL.md")
    [ "$pkg" = vitals-collector ] && want+=(/usr/bin/vitals /usr/share/vitals/grafana/vitals-fleet.json)
    for w in "${want[@]}"; do
        grep -qx "$w" <<<"$listing" || fail "$f does not list $w"
    done
    grep -q "^Name *: $pkg\$" <<<"$listing" || fail "$f: wrong name"
    grep -q "^Version *: $version\$" <<<"$listing" || fail "$f: wrong version"
    flags=$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$f")
    grep -qx "$conf cn" <<<"$flags" || fail "$f: $conf is not %config(noreplace): $(grep "$conf" <<<"$flags")"
    scripts=$(rpm -qp --scripts "$f")
    for s in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet"; do
        grep -q "^$s" <<<"$scripts" || fail "$f has no $s"
    done
    grep -q "/usr/lib/$pkg/maint setup" <<<"$scripts" || fail "$f: postinstall does not set up"
    echo "    $f: $(wc -l <<<"$listing") lines, files and scriptlets as expected"
done

step "dpkg -i $version"
dpkg -i "$(deb vitals-agent "$version")" "$(deb vitals-collector "$version")" >"$work/install.log" 2>&1 ||
    { cat "$work/install.log"; fail "dpkg -i"; }
cat "$work/install.log"
touch "$marker"
# No certificates yet: enabled, not started, and told what to do next.
for pkg in vitals-agent vitals-collector; do
    grep -q "^$pkg: not started" "$work/install.log" || fail "$pkg's postinst did not say it was not started"
done
grep -q -- "--name NODE --role agent" "$work/install.log" || fail "no next step for the agent"

step "files, user, directories, conffiles"
for f in /usr/bin/vitals-agent /usr/bin/vitals-collector /usr/bin/vitals \
    /usr/lib/systemd/system/vitals-agent.service /usr/lib/systemd/system/vitals-collector.service \
    /usr/lib/vitals-agent/maint /usr/lib/vitals-collector/maint \
    /etc/vitals/agent.toml /etc/vitals/collector.toml \
    /usr/share/doc/vitals-agent/INSTALL.md /usr/share/doc/vitals-collector/README.md \
    /usr/share/vitals/grafana/vitals-fleet.json; do
    [ -e "$f" ] || fail "$f not installed"
done
for pkg in vitals-agent vitals-collector; do
    conffiles=$(dpkg-query -W -f='${Conffiles}\n' "$pkg")
    grep -q "^ /etc/vitals/${pkg#vitals-}.toml " <<<"$conffiles" || fail "$pkg: no conffile /etc/vitals/${pkg#vitals-}.toml: $conffiles"
    [ -L "/etc/systemd/system/multi-user.target.wants/$pkg.service" ] || fail "$pkg.service not enabled"
done
entry=$(getent passwd vitals) || fail "no user vitals"
IFS=: read -r _ _ uid _ _ home shell <<<"$entry"
[ "$uid" -lt 1000 ] || fail "vitals is not a system user (uid $uid)"
case "$shell" in */nologin | */false) ;; *) fail "vitals has a login shell: $shell" ;; esac
[ "$(stat -c '%U:%G %a' /var/lib/vitals-agent)" = "vitals:vitals 750" ] || fail "/var/lib/vitals-agent: $(stat -c '%U:%G %a' /var/lib/vitals-agent)"
[ "$(stat -c '%U:%G %a' /var/lib/vitals-collector)" = "vitals:vitals 750" ] || fail "/var/lib/vitals-collector: $(stat -c '%U:%G %a' /var/lib/vitals-collector)"
[ "$(stat -c '%U:%G %a' /etc/vitals/tls)" = "vitals:vitals 700" ] || fail "/etc/vitals/tls: $(stat -c '%U:%G %a' /etc/vitals/tls)"
echo "    user vitals (uid $uid, home $home, shell $shell); state and tls directories; conffiles; units enabled"

step "systemd-analyze verify and security"
for pkg in vitals-agent vitals-collector; do
    unit=/usr/lib/systemd/system/$pkg.service
    if ! systemd-analyze verify "$unit" >"$work/verify.log" 2>&1; then
        cat "$work/verify.log"
        fail "systemd-analyze verify $unit"
    fi
    # Anything it says about our unit is a finding.
    if grep -q "$pkg" "$work/verify.log"; then
        cat "$work/verify.log"
        fail "systemd-analyze verify has remarks on $unit"
    fi
    systemd-analyze security --offline=yes "$unit" >"$work/security-$pkg.log" 2>&1 || true
    score=$(grep -o "Overall exposure level for $pkg.service: .*" "$work/security-$pkg.log") ||
        { cat "$work/security-$pkg.log"; fail "no security score for $pkg"; }
    echo "    $score"
done
grep -Eq "Overall exposure level for vitals-collector.service: [0-9.]+ (PERFECT|SAFE|OK)" "$work/security-vitals-collector.log" ||
    fail "the collector's unit scores worse than OK"

step "check-config on the installed default configs"
as_vitals() { setpriv --reuid=vitals --regid=vitals --init-groups -- "$@"; }
for pkg in vitals-agent vitals-collector; do
    set +e
    as_vitals "/usr/bin/$pkg" check-config >"$work/check.log" 2>&1
    rc=$?
    set -e
    [ $rc = 2 ] || fail "$pkg check-config without certificates: exit $rc, want 2"
    grep -q "/etc/vitals/tls/ca.pem" "$work/check.log" || fail "$pkg check-config does not name the missing file: $(cat "$work/check.log")"
done
# Certificates as docs/INSTALL.md issues them: the CA stays elsewhere.
ca=$work/ca
vitals certs init --dir "$ca" >/dev/null
vitals certs issue --dir "$ca" --name collector --role collector --dns localhost --ip 127.0.0.1 >/dev/null
vitals certs issue --dir "$ca" --name pkgtest-node --role agent >/dev/null
vitals certs issue --dir "$ca" --name operator --role operator >/dev/null
install -m 0644 -o vitals -g vitals "$ca/ca.pem" /etc/vitals/tls/ca.pem
install -m 0644 -o vitals -g vitals "$ca/collector.pem" /etc/vitals/tls/collector.pem
install -m 0600 -o vitals -g vitals "$ca/collector.key" /etc/vitals/tls/collector.key
install -m 0644 -o vitals -g vitals "$ca/pkgtest-node.pem" /etc/vitals/tls/agent.pem
install -m 0600 -o vitals -g vitals "$ca/pkgtest-node.key" /etc/vitals/tls/agent.key
for pkg in vitals-agent vitals-collector; do
    as_vitals "/usr/bin/$pkg" check-config || fail "$pkg check-config with certificates"
done

step "edit the configs (the upgrade must keep the edits)"
port=
for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || fail "no free port"
sed -i "s|^listen = .*|listen = \"127.0.0.1:$port\"  # edited by the package test|" /etc/vitals/collector.toml
sed -i -e "s|^collector = .*|collector = \"https://127.0.0.1:$port\"  # edited by the package test|" \
    -e 's|^interval = .*|interval = "500ms"|' /etc/vitals/agent.toml
grep -q "edited by the package test" /etc/vitals/agent.toml || fail "sed did not edit agent.toml"
grep -q "edited by the package test" /etc/vitals/collector.toml || fail "sed did not edit collector.toml"
cat >"$work/cli.toml" <<CLI
collector = "https://127.0.0.1:$port"
ca = "$ca/ca.pem"
cert = "$ca/operator.pem"
key = "$ca/operator.key"
CLI

start_daemon() { # NAME: starts /usr/bin/NAME as vitals, logging to $work/NAME.log
    setpriv --reuid=vitals --regid=vitals --init-groups -- "/usr/bin/$1" >>"$work/$1.log" 2>&1 &
    pids+=($!)
    eval "pid_${1//-/_}=$!"
}
stop_daemon() { # NAME
    local var="pid_${1//-/_}"
    local pid=${!var}
    kill -TERM "$pid"
    local rc=0
    wait "$pid" || rc=$?
    [ $rc = 0 ] || fail "$1 exited $rc after SIGTERM"
}
wait_for() { # SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 4))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    fail "$what (after ${secs}s)"
}
cycles() { # how many agent cycles the collector stored
    vitals --config "$work/cli.toml" query vitals_agent_cycles_total --start 2000-01-01T00:00:00Z --end now --json |
        grep -o '\[[0-9]*,[0-9.e+]*\]' | wc -l
}
has_cycles() { [ "$(cycles)" -ge "$1" ]; }

step "run the installed collector and agent by hand, as vitals"
start_daemon vitals-collector
wait_for 30 "the collector listens on 127.0.0.1:$port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
start_daemon vitals-agent
wait_for 60 "the agent's samples arrive" has_cycles 5
vitals --config "$work/cli.toml" nodes | tee "$work/nodes.txt"
grep -q pkgtest-node "$work/nodes.txt" || fail "node pkgtest-node not listed"
stop_daemon vitals-agent
stop_daemon vitals-collector
[ -f /var/lib/vitals-collector/vitals.db ] || fail "no database in /var/lib/vitals-collector"
[ "$(stat -c %U /var/lib/vitals-collector/vitals.db)" = vitals ] || fail "the database is not the vitals user's"
[ -f /var/lib/vitals-agent/spool.db ] || fail "no spool in /var/lib/vitals-agent"
echo "    data arrived; both stopped cleanly on SIGTERM"

step "upgrade: dpkg -i $next"
dpkg -i "$(deb vitals-agent "$next")" "$(deb vitals-collector "$next")" >"$work/upgrade.log" 2>&1 ||
    { cat "$work/upgrade.log"; fail "dpkg -i $next"; }
cat "$work/upgrade.log"
for pkg in vitals-agent vitals-collector; do
    v=$(dpkg-query -W -f='${Version}' "$pkg")
    [ "$v" = "$next-1" ] || fail "$pkg is at $v after the upgrade"
done
grep -q "edited by the package test" /etc/vitals/agent.toml || fail "the upgrade lost the edit of agent.toml"
grep -q "edited by the package test" /etc/vitals/collector.toml || fail "the upgrade lost the edit of collector.toml"
if ls /etc/vitals/*.dpkg-* >/dev/null 2>&1; then fail "the upgrade left $(ls /etc/vitals/*.dpkg-*)"; fi
start_daemon vitals-collector
wait_for 30 "the upgraded collector listens" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
before=$(cycles)
[ "$before" -ge 5 ] || fail "the data stored before the upgrade is gone ($before cycles)"
start_daemon vitals-agent
wait_for 60 "the upgraded agent's samples arrive" has_cycles $((before + 3))
stop_daemon vitals-agent
stop_daemon vitals-collector
echo "    config edits and $before stored cycles survived; the upgraded daemons run"

step "dpkg -r"
dpkg -r vitals-agent vitals-collector >"$work/remove.log" 2>&1 || { cat "$work/remove.log"; fail "dpkg -r"; }
for f in /usr/bin/vitals-agent /usr/bin/vitals-collector /usr/bin/vitals \
    /usr/lib/systemd/system/vitals-agent.service /usr/lib/systemd/system/vitals-collector.service; do
    [ ! -e "$f" ] || fail "$f is still there after dpkg -r"
done
for f in /etc/vitals/agent.toml /etc/vitals/collector.toml /var/lib/vitals-agent/spool.db \
    /var/lib/vitals-collector/vitals.db /etc/vitals/tls/agent.key; do
    [ -e "$f" ] || fail "$f is gone after dpkg -r (only purge removes it)"
done
getent passwd vitals >/dev/null || fail "dpkg -r removed the user"
for pkg in vitals-agent vitals-collector; do
    dpkg-query -W -f='${Status}\n' "$pkg" | grep -q "config-files" || fail "$pkg is not in state config-files"
done
echo "    binaries and units gone; configs, state, certificates and the user kept"

step "dpkg -P"
dpkg -P vitals-agent vitals-collector >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "dpkg -P"; }
for f in /etc/vitals/agent.toml /etc/vitals/collector.toml /var/lib/vitals-agent /var/lib/vitals-collector \
    /etc/systemd/system/multi-user.target.wants/vitals-agent.service \
    /etc/systemd/system/multi-user.target.wants/vitals-collector.service; do
    [ ! -e "$f" ] || fail "$f is still there after dpkg -P"
done
getent passwd vitals >/dev/null || fail "dpkg -P removed the user (it must stay)"
[ -f /etc/vitals/tls/agent.key ] || fail "dpkg -P removed the operator's certificates"
echo "    remains after purge: user vitals, $(find /etc/vitals -type f ! -name .package-test | wc -l) certificate files in /etc/vitals/tls (the operator's)"

echo "package test: passed in $((SECONDS - began))s"

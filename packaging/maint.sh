#!/bin/sh
# Install-time steps of the vitals-agent and vitals-collector packages, for
# their .deb and .rpm scripts alike. Installed as /usr/lib/PACKAGE/maint; the
# package is the name of that directory.
#
#   maint setup            the vitals user, state and certificate directories
#   maint enable           enable the unit (the .rpm's way; the .deb's
#                          debhelper part does it with deb-systemd-helper)
#   maint start first      after a first install: start the service if its
#   maint start upgrade    config and certificates check out (an upgrade
#                          restarts it if it runs), else say what to do next
#   maint stop             before removal: stop and disable the service
#
# Works without systemd (containers, CI, TrueNAS's apt-less setups): then
# nothing is started and the message says how to run the daemon by hand.
set -e

pkg=$(basename "$(dirname "$(readlink -f "$0")")")
case "$pkg" in
vitals-agent) conf=/etc/vitals/agent.toml cert=agent ;;
vitals-collector) conf=/etc/vitals/collector.toml cert=collector ;;
*)
    echo "maint: not installed as /usr/lib/vitals-agent/maint or /usr/lib/vitals-collector/maint" >&2
    exit 1
    ;;
esac
unit="$pkg.service"
user=vitals
tls=/etc/vitals/tls
doc=/usr/share/doc/$pkg/INSTALL.md

systemd_running() { [ -d /run/systemd/system ]; }

nologin() {
    for s in /usr/sbin/nologin /sbin/nologin; do
        [ -x "$s" ] && { echo "$s"; return; }
    done
    echo /bin/false
}

create_user() {
    getent passwd "$user" >/dev/null && return 0
    if command -v systemd-sysusers >/dev/null 2>&1 && [ -f "/usr/lib/sysusers.d/$pkg.conf" ]; then
        systemd-sysusers "$pkg.conf" && getent passwd "$user" >/dev/null && return 0
    fi
    if command -v adduser >/dev/null 2>&1 && adduser --help 2>&1 | grep -q -- --system; then
        adduser --system --group --no-create-home --home / --shell "$(nologin)" \
            --gecos "Vitals monitoring" "$user" >/dev/null
    else
        useradd --system --user-group --no-create-home --home-dir / \
            --shell "$(nologin)" --comment "Vitals monitoring" "$user"
    fi
}

setup() {
    create_user
    # The state directory; systemd's StateDirectory= would create it too,
    # but a daemon started by hand needs it as well.
    install -d -m 0750 -o "$user" -g "$user" "/var/lib/$pkg"
    install -d -m 0755 /etc/vitals
    # Keys live here; an existing directory is the operator's and stays as it is.
    [ -d "$tls" ] || install -d -m 0700 -o "$user" -g "$user" "$tls"
    if [ "$pkg" = vitals-agent ]; then
        # ROCm's /dev/kfd and /dev/dri/renderD* belong to these groups.
        for g in render video; do
            if getent group "$g" >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$g"; then
                usermod -a -G "$g" "$user" || true
            fi
        done
    fi
}

# Runs check-config as the daemon's user, as the unit's ExecStartPre does.
check() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "/usr/bin/$pkg" check-config --config "$conf" 2>&1
    else
        "/usr/bin/$pkg" check-config --config "$conf" 2>&1
    fi
}

advise() {
    if [ "$pkg" = vitals-agent ]; then
        name=NODE
    else
        name=collector
    fi
    echo "  Next: where the Vitals CA is kept, issue this host's certificate:"
    echo "    vitals certs issue --dir CA_DIR --name $name --role $cert"
    echo "  copy ca.pem, $name.pem and $name.key into $tls as ca.pem, $cert.pem and"
    echo "  $cert.key (chown $user, key mode 0600), edit $conf, then:"
    echo "    $pkg check-config && systemctl start $unit"
    echo "  Step by step: $doc"
}

start() {
    mode=$1
    if ! out=$(check); then
        echo "$pkg: not started, as its configuration does not check out yet:"
        echo "$out" | sed 's/^/    /'
        advise
        return 0
    fi
    if ! systemd_running; then
        echo "$pkg: systemd is not running here, so nothing was started."
        echo "  Run it by hand as $user: runuser -u $user -- /usr/bin/$pkg --config $conf"
        return 0
    fi
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "$mode" = upgrade ]; then
        systemctl try-restart "$unit" || echo "$pkg: restart failed; see journalctl -u $unit"
    elif systemctl is-enabled --quiet "$unit" 2>/dev/null; then
        systemctl start "$unit" || echo "$pkg: start failed; see journalctl -u $unit"
    fi
}

enable() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl enable "$unit" >/dev/null 2>&1 || echo "$pkg: could not enable $unit"
    fi
}

stop() {
    if systemd_running; then
        systemctl stop "$unit" >/dev/null 2>&1 || true
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable "$unit" >/dev/null 2>&1 || true
    fi
}

case "$1" in
setup) setup ;;
enable) enable ;;
start) start "${2:-first}" ;;
stop) stop ;;
*)
    echo "usage: $0 setup | enable | start first|upgrade | stop" >&2
    exit 2
    ;;
esac

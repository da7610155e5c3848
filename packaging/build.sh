#!/usr/bin/env bash
# Builds the Vitals packages into target/packages/:
#   vitals-agent      the agent, its unit, /etc/vitals/agent.toml
#   vitals-collector  the collector, its unit, /etc/vitals/collector.toml,
#                     the `vitals` CLI and the Grafana dashboard
#                     (/usr/share/vitals/grafana/vitals-fleet.json)
# each as .deb (cargo-deb) and .rpm (cargo-generate-rpm), both installed
# here first if missing. Their metadata is in agent/Cargo.toml and
# collector/Cargo.toml; the files they ship are in packaging/ and systemd/.
#
#   packaging/build.sh                     release packages
#   packaging/build.sh --profile dev       packages of the debug build that
#                                          ./scripts/test already made (the
#                                          package test uses them: no second
#                                          build of the workspace)
#   packaging/build.sh --version 0.1.1     another package version (the
#                                          binaries keep the workspace's)
#   packaging/build.sh --deb-only          skip the .rpm files
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

profile=release version="" rpm=1
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --deb-only) rpm=0; shift ;;
    *) echo "usage: $0 [--profile release|dev|NAME] [--version X.Y.Z] [--deb-only]" >&2; exit 2 ;;
    esac
done

# Pinned: the metadata is written for these versions.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
if ! cargo deb --version 2>/dev/null | grep -q " $CARGO_DEB_VERSION\$"; then
    echo "==> cargo install cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
if [ $rpm = 1 ] && ! cargo generate-rpm --version 2>/dev/null | grep -q " $CARGO_GENERATE_RPM_VERSION\$"; then
    echo "==> cargo install cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
    cargo install --locked cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION"
fi

echo "==> cargo build --profile $profile (vitals-agent, vitals-collector, vitals)"
cargo build --locked --profile "$profile" -p vitals-agent -p vitals-collector -p vitals-cli --bins
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
out=target/packages
mkdir -p "$out"

deb_args=(--no-build --profile "$profile" -o "$out")
# Test packages: quick compression (the debug build's binaries are large).
[ "$profile" = release ] || deb_args+=(--fast)
[ -z "$version" ] || deb_args+=(--deb-version "$version-1")
for pkg in vitals-agent vitals-collector; do
    echo "==> cargo deb -p $pkg"
    # cargo-deb warns that a dev profile is meant for tests; it is, here.
    cargo deb "${deb_args[@]}" -p "$pkg" 2>&1 | grep -v -e 'dev profile is not supported' -e 'To enable debug symbols set' || true
    test -s "$out/${pkg}_${version:-$(cargo pkgid -p "$pkg" | sed 's/.*[#@]//')}-1_amd64.deb"
done

if [ $rpm = 1 ]; then
    # cargo-generate-rpm packs binaries as they are: pack stripped copies,
    # from a target directory of their own.
    stage="$out/.stage"
    rm -rf "$stage"
    mkdir -p "$stage/$dir"
    for bin in vitals-agent vitals-collector vitals; do
        strip -o "$stage/$dir/$bin" "target/$dir/$bin"
    done
    rpm_args=(--profile "$profile" --target-dir "$stage" -o "$out")
    # Test packages: gzip takes seconds where the default zstd takes minutes.
    [ "$profile" = release ] || rpm_args+=(--payload-compress gzip)
    [ -z "$version" ] || rpm_args+=(-s "version = \"$version\"")
    for pkg in vitals-agent vitals-collector; do
        echo "==> cargo generate-rpm -p $pkg"
        cargo generate-rpm "${rpm_args[@]}" -p "${pkg#vitals-}"
    done
    rm -rf "$stage"
fi
ls -l "$out"

#!/usr/bin/env bash
# Builds the Debian package ev-site-gateway_<version>_<arch>.deb from this checkout.
#
#   bash packaging/build-deb.sh [--check] [--out DIR] [--python PYTHON] [--xz]
#
# The application lives in its own virtual environment at /opt/evgw/venv, made with the
# system Python (default /usr/bin/python3, resolved to its versioned binary) and filled with
# the project wheel built from this checkout plus its dependencies from the package registry.
# The venv is built in a staging root and then relocated: the staging prefix is stripped from
# bin/* scripts and pyvenv.cfg, byte code is compiled with the final paths, and the build fails
# if any file still names a build directory.
#
# --check (CI) builds, then inspects the package (control fields, conffiles, maintainer
# scripts, file list), extracts it into a scratch root and runs the extracted gateway:
# `evgw --version`, `evgw drivers` and `evgw check-config` on the shipped configuration.
# Where a private mount namespace is available (root, or unprivileged user namespaces) it also
# mounts the extracted /opt over /opt and runs /usr/bin/evgw through its real shebang and
# symlink, then `evgw run` on the shipped configuration under MemoryDenyWriteExecute (the
# kernel's PR_SET_MDWE, which is what the unit's MemoryDenyWriteExecute= enforces), stopped
# with SIGTERM, expecting exit status 0, and a short `evgw demo` under the same restriction
# (Modbus, MQTT broker and client, SQLite). Finally `systemd-analyze verify` checks the unit
# against the extracted root where systemd-analyze exists. Every step that cannot run says so.
set -euo pipefail
umask 022

cd "$(dirname "$0")/.."
REPO=$(pwd)
START_S=${EVGW_DEB_START_S:-$(date +%s)}
export EVGW_DEB_START_S=$START_S

die() { echo "build-deb: error: $*" >&2; exit 1; }
step() { echo "build-deb: [$(( $(date +%s) - START_S ))s] $*"; }
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }

# ---- in-namespace payload check (re-invoked by --check through unshare) -------------------
if [ "${1:-}" = "--in-namespace" ]; then
    ROOT=$2
    VERSION=$3
    mount --bind "$ROOT/opt" /opt
    mount -t tmpfs -o mode=0755 tmpfs /var/lib
    mkdir -p /var/lib/evgw
    # Through the symlink and the shebang exactly as installed.
    out=$(env -i PATH=/usr/bin:/bin "$ROOT/usr/bin/evgw" --version) \
        || die "/usr/bin/evgw --version failed at the installed path"
    [ "$out" = "evgw $VERSION" ] || die "/usr/bin/evgw --version printed '$out', expected 'evgw $VERSION'"
    step "  installed path: /usr/bin/evgw -> /opt/evgw/venv/bin/evgw runs: $out"
    # `evgw run` on the shipped configuration, with W+X memory refused like the unit does.
    log=$(mktemp)
    /opt/evgw/venv/bin/python -I -c '
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("build-deb:   (kernel without PR_SET_MDWE: running without it)", file=sys.stderr)
os.execve(sys.argv[1], sys.argv[1:], {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})
' /opt/evgw/venv/bin/evgw --log-json run -c "$ROOT/etc/evgw/site.yaml" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        [ -s /var/lib/evgw/buffer.db ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    if ! kill -TERM "$pid" 2>/dev/null; then
        cat "$log" >&2
        die "evgw run exited before SIGTERM"
    fi
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        cat "$log" >&2
        die "evgw run exited $rc after SIGTERM (the unit expects 0)"
    fi
    [ -s /var/lib/evgw/buffer.db ] || { cat "$log" >&2; die "evgw run did not create /var/lib/evgw/buffer.db"; }
    step "  evgw run on the shipped site.yaml under MDWE: buffer created, SIGTERM -> exit 0"
    # The shipped config polls nothing; the demo exercises what a real site does (Modbus
    # clients against simulated devices, an MQTT broker and client, SQLite), under MDWE.
    demo_dir=$(mktemp -d)
    if ! /opt/evgw/venv/bin/python -I -c '
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(65, 1, 0, 0, 0)
os.execve(sys.argv[1], sys.argv[1:], {"PATH": "/usr/bin:/bin"})
' /opt/evgw/venv/bin/evgw demo --duration 6s --no-view --dir "$demo_dir" >"$log" 2>&1; then
        cat "$log" >&2
        die "evgw demo failed under MDWE"
    fi
    grep -q "charging" "$log" || { cat "$log" >&2; die "evgw demo under MDWE showed no charging"; }
    step "  evgw demo (simulated site, MQTT, SQLite) under MDWE: exit 0"
    rm -rf "$log" "$demo_dir"
    if command -v systemd-analyze >/dev/null 2>&1; then
        # Here ExecStart exists at its real path, so verify has nothing to excuse. It checks
        # the unit's syntax, every directive name and value, and that ExecStart is executable;
        # it does not resolve User= (evgw exists only after postinst).
        unit=$(mktemp -d)/evgw.service
        cp "$ROOT/lib/systemd/system/evgw.service" "$unit"
        if ! sa_out=$(systemd-analyze verify "$unit" 2>&1) || [ -n "$sa_out" ]; then
            echo "$sa_out" >&2
            die "systemd-analyze verify evgw.service failed or warned"
        fi
        step "  systemd-analyze verify evgw.service: clean"
        exposure=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -n1 || true)
        [ -z "$exposure" ] || step "  systemd-analyze security: ${exposure#→ }"
    else
        step "  SKIPPED systemd-analyze verify (not installed)"
    fi
    exit 0
fi

# ---- arguments --------------------------------------------------------------------------------
CHECK=0
# gzip: seconds to build and readable by every dpkg; --xz is ~30% smaller and ~20x slower.
COMPRESS=(-Zgzip -z6)
OUT_DIR=$REPO/packaging/out
PYTHON=${EVGW_DEB_PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
    case "$1" in
    --check) CHECK=1 ;;
    --xz) COMPRESS=(-Zxz -z6) ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (apt-get install dpkg)"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (the target system's python3)"
PY_VER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is $PY_VER; need >= 3.11"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot make virtual environments (apt-get install python3-venv)"
# The venv's python links to this binary: use the versioned one, which a later default
# python3 of another minor version does not replace.
PY_BIN=$(command -v "$PYTHON")
[ -x "$(dirname "$PY_BIN")/python$PY_VER" ] && PY_BIN=$(dirname "$PY_BIN")/python$PY_VER
case "$PY_BIN" in
/usr/bin/*) ;;
*) echo "build-deb: warning: $PY_BIN is not a system interpreter; the package will only work where it exists" >&2 ;;
esac

VERSION=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' gateway/__init__.py)
[ -n "$VERSION" ] || die "no __version__ = \"...\" in gateway/__init__.py"
ARCH=$(dpkg --print-architecture)
PKG=ev-site-gateway
DEB_NAME=${PKG}_${VERSION}_${ARCH}.deb
VENV_PATH=/opt/evgw/venv

WORK=$(mktemp -d "${TMPDIR:-/tmp}/evgw-deb.XXXXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/stage
VENV=$STAGE$VENV_PATH

# ---- virtual environment ----------------------------------------------------------------------
step "building $DEB_NAME with $PY_BIN ($PY_VER)"
mkdir -p "$(dirname "$VENV")"
"$PY_BIN" -m venv "$VENV" || die "python -m venv failed"
PIP_LOG=$WORK/pip.log
pip_q() {
    # pip -q still prints registry warnings (one per unreachable mirror on some machines):
    # show its output only when it fails.
    if ! "$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q "$@" >"$PIP_LOG" 2>&1; then
        cat "$PIP_LOG" >&2
        return 1
    fi
}

step "building the project wheel from $REPO"
pip_q wheel --no-deps -w "$WORK/wheel" "$REPO" || die "building the wheel failed"
WHEELS=("$WORK"/wheel/*.whl)
[ ${#WHEELS[@]} -eq 1 ] && [ -f "${WHEELS[0]}" ] || die "expected one wheel, got: ${WHEELS[*]}"

step "installing $(basename "${WHEELS[0]}") and its dependencies"
pip_q install --no-compile "${WHEELS[0]}" || die "pip install failed (registry reachable?)"
# pip and setuptools only serve to install: /opt/evgw/venv belongs to dpkg, not to pip.
pip_q uninstall -y pip setuptools >/dev/null || die "removing pip from the venv failed"

# ---- relocation: staging paths -> /opt/evgw/venv ---------------------------------------------
step "relocating the venv to $VENV_PATH"
for f in "$VENV"/bin/* "$VENV/pyvenv.cfg"; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    if grep -qF "$STAGE" "$f"; then
        STAGE="$STAGE" perl -pi -e 's/\Q$ENV{STAGE}\E//g' "$f"
    fi
done
# PEP 610 record of where the wheel came from (a build directory): optional, drop it.
find "$VENV/lib" -path '*.dist-info/direct_url.json' -print0 | while IFS= read -r -d '' f; do
    rm -f "$f"
    sed -i '/\.dist-info\/direct_url\.json,/d' "$(dirname "$f")/RECORD"
done
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
# Byte code with the final paths in tracebacks; the service cannot write it at run time.
"$VENV/bin/python" -m compileall -q -j 0 -s "$STAGE" -p / "$VENV/lib" >/dev/null \
    || die "compileall failed"
leftover=$(grep -rlF "$WORK" "$STAGE" || true)
[ -z "$leftover" ] || die "build paths left in the payload: $leftover"
head -n1 "$VENV/bin/evgw" | grep -qx "#!$VENV_PATH/bin/python" \
    || die "bin/evgw shebang is '$(head -n1 "$VENV/bin/evgw")'"

# ---- the rest of the file system ----------------------------------------------------------------
install -D -m 0644 packaging/site.yaml "$STAGE/etc/evgw/site.yaml"
install -D -m 0644 packaging/evgw.service "$STAGE/lib/systemd/system/evgw.service"
mkdir -p "$STAGE/usr/bin" "$STAGE/var/lib/evgw"
ln -s "$VENV_PATH/bin/evgw" "$STAGE/usr/bin/evgw"
DOC=$STAGE/usr/share/doc/$PKG
install -D -m 0644 packaging/debian/copyright "$DOC/copyright"
install -m 0644 README.md "$DOC/README.md"
[ -f docs/installing.md ] && install -m 0644 docs/installing.md "$DOC/installing.md"

mkdir -p "$STAGE/DEBIAN"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$STAGE/DEBIAN/$s"
done
echo /etc/evgw/site.yaml >"$STAGE/DEBIAN/conffiles"
INSTALLED_KB=$(du -sk --apparent-size --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: ev-site-gateway developers <evgw@localhost>
Installed-Size: $INSTALLED_KB
Depends: python$PY_VER, python3 (>= 3.11)
Recommends: mosquitto-clients
Section: net
Priority: optional
Homepage: https://example.invalid/ev-site-gateway
Description: edge gateway for EV charging sites
 Reads chargers and meters over Modbus TCP and RTU, tracks and prices charging
 sessions, buffers everything in SQLite and forwards it to the cloud over MQTT.
 .
 The application and its Python dependencies live in a virtual environment in
 /opt/evgw/venv, built for the system's python$PY_VER (compiled wheels: the
 package is architecture-specific). Runs as the system user evgw under the
 systemd unit evgw.service; configuration in /etc/evgw/site.yaml.
EOF

mkdir -p "$OUT_DIR"
DEB=$(cd "$OUT_DIR" && pwd)/$DEB_NAME
step "dpkg-deb --build"
dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$STAGE" "$DEB" >/dev/null || die "dpkg-deb --build failed"
step "built $DEB ($(du -h "$DEB" | cut -f1), installed ${INSTALLED_KB} KiB)"

[ "$CHECK" -eq 1 ] || exit 0

# ---- --check ------------------------------------------------------------------------------------
step "check: control data"
INFO=$(dpkg-deb --info "$DEB")
for field in "Package: $PKG" "Version: $VERSION" "Architecture: $ARCH" "Depends: python$PY_VER"; do
    grep -qF " $field" <<<"$INFO" || die "dpkg-deb --info lacks '$field'"
done
CTRL=$WORK/control
dpkg-deb --control "$DEB" "$CTRL"
[ "$(cat "$CTRL/conffiles")" = /etc/evgw/site.yaml ] || die "conffiles is '$(cat "$CTRL/conffiles")'"
for s in postinst prerm postrm; do
    [ -x "$CTRL/$s" ] || die "maintainer script $s missing or not executable"
    sh -n "$CTRL/$s" || die "maintainer script $s: syntax error"
done

step "check: file list"
CONTENTS=$(dpkg-deb --contents "$DEB")
expect() { grep -qE "$1" <<<"$CONTENTS" || die "dpkg-deb --contents: no line matching /$1/"; }
expect '^-rw-r--r-- root/root .* \./etc/evgw/site\.yaml$'
expect '^-rw-r--r-- root/root .* \./lib/systemd/system/evgw\.service$'
expect '^lrwxrwxrwx root/root .* \./usr/bin/evgw -> /opt/evgw/venv/bin/evgw$'
expect '^-rwxr-xr-x root/root .* \./opt/evgw/venv/bin/evgw$'
expect '^lrwxrwxrwx root/root .* \./opt/evgw/venv/bin/python -> '
expect '^drwxr-xr-x root/root .* \./var/lib/evgw/$'
expect '^-rw-r--r-- root/root .* \./usr/share/doc/ev-site-gateway/copyright$'
expect '\./opt/evgw/venv/lib/python[0-9.]+/site-packages/gateway/drivers/eastron-sdm630\.yaml$'
! grep -qE '/(pip|setuptools)/__init__\.py$' <<<"$CONTENTS" || die "pip/setuptools left in the venv"
if grep -vE '^[-dl]' <<<"$CONTENTS" | grep -q .; then die "unexpected file types in the payload"; fi

step "check: extracted payload"
ROOT=$WORK/root
dpkg-deb -x "$DEB" "$ROOT"
RVENV=$ROOT$VENV_PATH
# Run the extracted entry point with the extracted venv's interpreter (a venv finds its
# site-packages from the pyvenv.cfg next to the interpreter's path, wherever it is), from /,
# isolated from PYTHON* variables and user site-packages, so nothing of this checkout is used.
run_extracted() { (cd / && env -i PATH=/usr/bin:/bin "$RVENV/bin/python" -I "$RVENV/bin/evgw" "$@"); }
origin=$(cd / && env -i "$RVENV/bin/python" -I -c 'import gateway; print(gateway.__file__)')
case "$origin" in
"$RVENV"/*) ;;
*) die "the extracted interpreter imported gateway from $origin" ;;
esac
out=$(run_extracted --version) || die "extracted evgw --version failed"
[ "$out" = "evgw $VERSION" ] || die "extracted evgw --version printed '$out'"
step "  evgw --version: $out"
n_shipped=$(find drivers -maxdepth 1 -name '*.yaml' | wc -l)
drivers_out=$(run_extracted drivers) || die "extracted evgw drivers failed"
for f in drivers/*.yaml; do
    slug=$(basename "$f" .yaml)
    grep -qw -- "$slug" <<<"$drivers_out" || die "extracted evgw drivers does not list $slug"
done
step "  evgw drivers: all $n_shipped shipped profiles listed"
run_extracted check-config -c "$ROOT/etc/evgw/site.yaml" >/dev/null \
    || die "the shipped /etc/evgw/site.yaml does not pass evgw check-config"
step "  evgw check-config: shipped site.yaml is valid"

if [ -d /opt ] && [ -d /var/lib ] && command -v unshare >/dev/null 2>&1 \
    && unshare --mount --map-root-user true 2>/dev/null; then
    step "check: installed paths (extracted /opt mounted over /opt in a private mount namespace)"
    unshare --mount --map-root-user bash "$0" --in-namespace "$ROOT" "$VERSION" \
        || die "payload check at the installed paths failed"
else
    step "check: SKIPPED running at /opt/evgw (no private mount namespace: needs root or user namespaces)"
    if command -v systemd-analyze >/dev/null 2>&1; then
        # Without the payload at /opt, verify can only complain that ExecStart is missing:
        # excuse exactly that line, nothing else.
        unit=$WORK/evgw.service
        cp "$ROOT/lib/systemd/system/evgw.service" "$unit"
        sa_out=$(systemd-analyze verify "$unit" 2>&1 || true)
        sa_rest=$(grep -vxF "evgw.service: Command $VENV_PATH/bin/evgw is not executable: No such file or directory" <<<"$sa_out" || true)
        if [ -n "$sa_rest" ]; then
            echo "$sa_rest" >&2
            die "systemd-analyze verify evgw.service warned"
        fi
        step "  systemd-analyze verify evgw.service: clean apart from the missing ExecStart binary"
    else
        step "  SKIPPED systemd-analyze verify (not installed)"
    fi
fi

step "check passed: $DEB"

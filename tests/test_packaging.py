"""Packaging: the systemd unit, the shipped configuration and the .deb built from this checkout.

The fast tests read packaging/ directly. The slow ones build the package once per session with
packaging/build-deb.sh (pip fetches the dependencies from the package registry: ~45 s), inspect
it with dpkg-deb, run the extracted gateway, and, as root, install, upgrade, remove and purge it
inside a throwaway overlay of this machine's root file system (a private mount namespace and a
chroot: nothing on the machine changes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import __version__
from gateway.config import load_config

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
UNIT = PACKAGING / "evgw.service"
BUILD = PACKAGING / "build-deb.sh"
VENV = "/opt/evgw/venv"
MISSING_EXEC = f"evgw.service: Command {VENV}/bin/evgw is not executable: No such file or directory"


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, repeated keys kept in order."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _namespace_ok() -> bool:
    return (
        shutil.which("unshare") is not None
        and _run(["unshare", "--mount", "--map-root-user", "true"]).returncode == 0
    )


# ---------------------------------------------------------------------------------------------
# fast: the unit file, maintainer scripts, the shipped configuration


def test_unit_runs_the_gateway_as_evgw_with_hardening() -> None:
    entries = _unit_entries(UNIT.read_text())
    service = {k: v for s, k, v in entries if s == "Service"}
    assert service["ExecStart"] == f"{VENV}/bin/evgw run -c /etc/evgw/site.yaml"
    assert service["Type"] in ("simple", "notify")
    assert (service["User"], service["Group"]) == ("evgw", "evgw")
    assert service["SupplementaryGroups"] == "dialout"
    assert service["Restart"] == "always"
    assert "RestartSec" in service
    assert service["RestartPreventExitStatus"] == "2"
    assert service["KillSignal"] == "SIGTERM"
    assert "TimeoutStopSec" in service
    assert service["StateDirectory"] == "evgw"
    assert service["ConfigurationDirectory"] == "evgw"
    assert "PYTHONUNBUFFERED=1" in [v for s, k, v in entries if k == "Environment"]
    required = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/evgw",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "DevicePolicy": "closed",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {k: service.get(k) for k in required} == required
    device_allow = [v for s, k, v in entries if k == "DeviceAllow"]
    for dev in ("char-ttyUSB rw", "char-ttyACM rw", "char-ttyS rw"):
        assert dev in device_allow
    # Settings that would hide the serial ports or unmap group dialout.
    assert "PrivateDevices" not in service
    assert "PrivateUsers" not in service
    install = {k: v for s, k, v in entries if s == "Install"}
    assert install["WantedBy"] == "multi-user.target"


@pytest.mark.e2e
def test_config_error_exit_status_is_the_one_the_unit_does_not_restart(tmp_path: Path) -> None:
    # RestartPreventExitStatus=2 relies on `evgw run` exiting 2 for a bad configuration.
    bad = tmp_path / "site.yaml"
    bad.write_text("site: {id: x}\nstorage: {path: b.db}\nbogus: 1\n")
    proc = _run([sys.executable, "-m", "gateway", "run", "-c", str(bad)], cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "bogus" in proc.stderr


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "evgw.service"
    shutil.copy(UNIT, unit)
    proc = _run(["systemd-analyze", "verify", str(unit)])
    # Outside an installed system the only complaint allowed is the missing ExecStart binary.
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln != MISSING_EXEC]
    assert lines == []
    # ... and the check can fail: a misspelt directive is reported.
    unit.write_text(UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    proc = _run(["systemd-analyze", "verify", str(unit)])
    assert "ProtectHom" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_maintainer_scripts_are_executable_posix_shell() -> None:
    for name in ("postinst", "prerm", "postrm"):
        script = PACKAGING / "debian" / name
        assert os.access(script, os.X_OK), f"{name} not executable"
        assert script.read_text().startswith("#!/bin/sh\n")
        proc = _run(["sh", "-n", str(script)])
        assert proc.returncode == 0, proc.stderr
    assert os.access(BUILD, os.X_OK)


@pytest.mark.e2e
def test_build_script_refuses_unknown_arguments() -> None:
    proc = _run(["bash", str(BUILD), "--frobnicate"])
    assert proc.returncode != 0
    assert "unknown argument '--frobnicate'" in proc.stderr


def test_shipped_config_is_valid_and_buffers_in_var_lib() -> None:
    config = load_config(PACKAGING / "site.yaml")
    assert str(config.storage.path) == "/var/lib/evgw/buffer.db"
    assert config.devices == ()
    assert config.uplink is None


def _uncomment_examples(text: str) -> str:
    """Uncomment the indented example entries (buses, devices, tokens) of the shipped config."""
    return "\n".join(re.sub(r"^(\s+)# ", r"\1", line) for line in text.splitlines()) + "\n"


def test_shipped_config_examples_are_valid_once_uncommented(tmp_path: Path) -> None:
    edited = tmp_path / "site.yaml"
    edited.write_text(_uncomment_examples((PACKAGING / "site.yaml").read_text()))
    config = load_config(edited)
    assert [d.id for d in config.devices] == ["cp1", "cp2", "m-cp2"]
    assert [b.id for b in config.buses] == ["rs485-1"]
    assert len(config.auth.tokens) == 2


# ---------------------------------------------------------------------------------------------
# slow: the .deb


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed (apt-get install dpkg)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no system /usr/bin/python3 to build the package's venv with")
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        ["bash", str(BUILD), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("*.deb")
    return path


@pytest.fixture(scope="session")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _arch() -> str:
    return _run(["dpkg", "--print-architecture"]).stdout.strip()


@pytest.mark.e2e
@pytest.mark.slow
def test_deb_control_conffiles_and_scripts(deb: Path, tmp_path: Path) -> None:
    assert deb.name == f"ev-site-gateway_{__version__}_{_arch()}.deb"
    info = _run(["dpkg-deb", "--info", str(deb)]).stdout
    fields = dict(
        re.findall(r"^ ([A-Z][A-Za-z-]+): (.*)$", info, flags=re.MULTILINE),
    )
    assert fields["Package"] == "ev-site-gateway"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == _arch()
    assert re.fullmatch(r"python3\.\d+, python3 \(>= 3\.11\)", fields["Depends"])
    assert fields["Recommends"] == "mosquitto-clients"
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "--control", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text() == "/etc/evgw/site.yaml\n"
    for name in ("postinst", "prerm", "postrm"):
        assert os.access(control / name, os.X_OK), name
        assert (control / name).read_bytes() == (PACKAGING / "debian" / name).read_bytes()


@pytest.mark.e2e
@pytest.mark.slow
def test_deb_file_list(deb: Path) -> None:
    lines = _run(["dpkg-deb", "--contents", str(deb)]).stdout.splitlines()
    by_path = {ln.split()[5]: ln for ln in lines}
    assert by_path["./usr/bin/evgw"].startswith("lrwxrwxrwx root/root")
    assert by_path["./usr/bin/evgw"].endswith(f"-> {VENV}/bin/evgw")
    assert by_path["./etc/evgw/site.yaml"].startswith("-rw-r--r-- root/root")
    assert by_path["./lib/systemd/system/evgw.service"].startswith("-rw-r--r-- root/root")
    assert by_path["./var/lib/evgw/"].startswith("drwxr-xr-x root/root")
    assert by_path[f".{VENV}/bin/evgw"].startswith("-rwxr-xr-x root/root")
    assert any(p.endswith("/site-packages/gateway/drivers/keba-p30.yaml") for p in by_path)
    for asset in ("index.html", "app.js", "style.css", "openapi.json"):  # the status page
        assert any(p.endswith(f"/site-packages/gateway/web/static/{asset}") for p in by_path)
    assert not any(re.search(r"/site-packages/(pip|setuptools)/", p) for p in by_path)


@pytest.mark.e2e
@pytest.mark.slow
def test_extracted_payload_runs_and_names_no_build_path(extracted: Path) -> None:
    venv = extracted / VENV.lstrip("/")
    assert (extracted / "lib/systemd/system/evgw.service").read_bytes() == UNIT.read_bytes()
    assert (extracted / "etc/evgw/site.yaml").read_bytes() == (PACKAGING / "site.yaml").read_bytes()
    assert (venv / "bin/evgw").read_text().splitlines()[0] == f"#!{VENV}/bin/python"
    pyvenv = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"(?m)^command = /usr/bin/python3\.\d+ -m venv /opt/evgw/venv$", pyvenv)
    env = {"PATH": "/usr/bin:/bin"}
    python = str(venv / "bin/python")
    origin = _run([python, "-I", "-c", "import gateway; print(gateway.__file__)"], cwd="/", env=env)
    assert origin.stdout.strip().startswith(str(venv)), origin.stdout + origin.stderr
    version = _run([python, "-I", str(venv / "bin/evgw"), "--version"], cwd="/", env=env)
    assert version.stdout.strip() == f"evgw {__version__}", version.stderr
    drivers = _run([python, "-I", str(venv / "bin/evgw"), "drivers"], cwd="/", env=env)
    assert drivers.returncode == 0, drivers.stderr
    for profile in (REPO / "drivers").glob("*.yaml"):
        assert profile.stem in drivers.stdout
    # Byte code names the installed files, so tracebacks point at real paths.
    pattern = str(venv / "lib/python3*/site-packages/gateway/__pycache__/cli.*.pyc")
    code = (
        f"import glob, marshal; f = glob.glob({pattern!r})[0]; "
        "print(marshal.loads(open(f, 'rb').read()[16:]).co_filename)"
    )
    filename = _run([python, "-I", "-c", code], env=env).stdout.strip()
    assert re.fullmatch(rf"{VENV}/lib/python3\.\d+/site-packages/gateway/cli\.py", filename)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_packaged_unit_verifies_with_the_payload_at_opt(extracted: Path, tmp_path: Path) -> None:
    if not _namespace_ok():
        pytest.skip("no private mount namespace (needs root or user namespaces)")
    unit = tmp_path / "evgw.service"
    shutil.copy(extracted / "lib/systemd/system/evgw.service", unit)
    proc = _run(
        [
            "unshare", "--mount", "--map-root-user", "sh", "-c",
            f'mount --bind "{extracted}/opt" /opt && systemd-analyze verify "{unit}"',
        ]
    )  # fmt: skip
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


# ---------------------------------------------------------------------------------------------
# slow, root only: install / upgrade / remove / purge in an overlay chroot

# Records every systemctl call; `is-active` answers from a flag file.
_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /run/systemctl.log
if [ "$1" = is-active ]; then [ -e /run/fake-evgw-active ]; exit $?; fi
exit 0
"""

_SCENARIO = r"""
set -u
say() { echo "$1=$2"; }
log() { tr '\n' ';' < /run/systemctl.log 2>/dev/null; : > /run/systemctl.log; }
mkdir -p /run/systemd/system
install -m 0755 /tmp/systemctl /usr/local/sbin/systemctl

out=$(dpkg -i /tmp/v1.deb 2>&1 < /dev/null); say install_rc $?
case "$out" in *"NOT started"*) say install_says_not_started yes ;; esac
say groups "$(id -nG evgw)"
say state_dir "$(stat -c '%U:%G:%a' /var/lib/evgw)"
say config "$(stat -c '%U:%G:%a' /etc/evgw/site.yaml)"
say link "$(readlink /usr/bin/evgw)"
say install_calls "$(log)"
runuser -u evgw -- evgw check-config -c /etc/evgw/site.yaml > /dev/null 2>&1; say check_as_evgw $?
runuser -u evgw -- touch /var/lib/evgw/buffer.db; say evgw_writes_state $?

sed -i 's/^  id: my-site /  id: edited-site /' /etc/evgw/site.yaml
touch /run/fake-evgw-active
dpkg -i /tmp/v2.deb > /dev/null 2>&1 < /dev/null; say upgrade_rc $?
say version "$(dpkg-query -W -f '${Version}' ev-site-gateway)"
say config_after_upgrade "$(grep -c 'id: edited-site' /etc/evgw/site.yaml)"
say upgrade_calls "$(log)"
say restart_flag_left "$([ -e /run/evgw.dpkg-restart ] && echo yes || echo no)"
say upgraded_runs "$(evgw --version)"

dpkg -r ev-site-gateway > /dev/null 2>&1 < /dev/null; say remove_rc $?
say remove_calls "$(log)"
left=$(ls -d /opt/evgw /usr/bin/evgw /var/lib/evgw/buffer.db /etc/evgw/site.yaml 2>/dev/null)
say after_remove "$(echo $left)"

dpkg -P ev-site-gateway > /dev/null 2>&1 < /dev/null; say purge_rc $?
say after_purge "$(ls -d /var/lib/evgw /etc/evgw 2>/dev/null | tr '\n' ' ')"
say user_kept "$(getent passwd evgw > /dev/null && echo yes || echo no)"
"""

_OVERLAY = r"""
set -eu
base=$1
mount -t tmpfs tmpfs "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
mount --rbind /dev "$base/root/dev"
mount -t proc proc "$base/root/proc"
mount -t tmpfs tmpfs "$base/root/run"
mount -t tmpfs tmpfs "$base/root/tmp"
cp "$2" "$base/root/tmp/v1.deb"
cp "$3" "$base/root/tmp/v2.deb"
cp "$4" "$base/root/tmp/systemctl"
cp "$5" "$base/root/tmp/scenario.sh"
exec chroot "$base/root" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash /tmp/scenario.sh
"""


def _repack(deb: Path, version: str, work: Path) -> Path:
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    out = work / f"v2_{version}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def overlay_lifecycle(deb: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("installing into an overlay chroot needs root")
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        pytest.skip("unshare/chroot not installed")
    if Path("/etc/passwd").exists() and "evgw:" in Path("/etc/passwd").read_text():
        pytest.skip("this machine already has a user evgw")
    v2 = _repack(deb, f"{__version__}+test1", tmp_path)
    (tmp_path / "systemctl").write_text(_SYSTEMCTL)
    (tmp_path / "scenario.sh").write_text(_SCENARIO)
    (tmp_path / "overlay.sh").write_text(_OVERLAY)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    mnt = Path(os.path.realpath(base)) / f"evgw-overlay-{os.getpid()}"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            [
                "unshare", "--mount", "--propagation", "private", "bash",
                str(tmp_path / "overlay.sh"), str(mnt), str(deb), str(v2),
                str(tmp_path / "systemctl"), str(tmp_path / "scenario.sh"),
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        mnt.rmdir()
    if proc.returncode != 0 and "overlay" in proc.stderr:
        pytest.skip(f"no overlay mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    facts = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    yield facts


@pytest.mark.e2e
@pytest.mark.slow
def test_install_upgrade_remove_purge(overlay_lifecycle: dict[str, str]) -> None:
    f = overlay_lifecycle
    # First install: user in dialout, private state and config, enabled but not started.
    assert f["install_rc"] == "0"
    assert f.get("install_says_not_started") == "yes"
    assert f["groups"].split() == ["evgw", "dialout"]
    assert f["state_dir"] == "evgw:evgw:750"
    assert f["config"] == "root:evgw:640"
    assert f["link"] == f"{VENV}/bin/evgw"
    assert f["install_calls"] == "daemon-reload;enable evgw.service;"
    assert f["check_as_evgw"] == "0"
    assert f["evgw_writes_state"] == "0"
    # Upgrade of a running gateway: the edited config stays, stop before, start after.
    assert f["upgrade_rc"] == "0"
    assert f["version"] == f"{__version__}+test1"
    assert f["config_after_upgrade"] == "1"
    assert f["upgrade_calls"] == (
        "is-active --quiet evgw.service;stop evgw.service;daemon-reload;start evgw.service;"
    )
    assert f["restart_flag_left"] == "no"
    assert f["upgraded_runs"] == f"evgw {__version__}"
    # Remove: stopped, code gone, config and buffer kept.
    assert f["remove_rc"] == "0"
    assert f["remove_calls"].startswith("stop evgw.service;")
    assert f["after_remove"].split() == ["/etc/evgw/site.yaml", "/var/lib/evgw/buffer.db"]
    # Purge: config and buffer gone; the system user stays (Debian practice).
    assert f["purge_rc"] == "0"
    assert f["after_purge"] == ""
    assert f["user_kept"] == "yes"

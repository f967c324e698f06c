"""Runs ``runner_ami/scripts/install.sh`` for real, as root, in an isolated root that plays the Packer build instance.

The root is this machine's own ``/usr`` under an overlay (so the real bash, coreutils, ``useradd``, ``systemctl``
and ``cloud-init`` run, and everything the script writes to ``/usr`` lands in an upper directory the test reads),
with an ``/etc``, ``/var``, ``/root`` and ``/home`` of its own, seeded with what a freshly launched Amazon Linux
2023 build instance holds that the image must not keep: SSH host keys, a machine id, cloud-init's state and logs,
shell histories. A base layer under the overlay adds the stand-ins of ``tests/ami_build/fakes.py`` for what needs
the network or Amazon Linux (``dnf``, ``curl``, ``aws``, the service manager's half of ``systemctl``); every
unit-file operation is the real ``systemctl --root=/`` of this machine's systemd 252, Amazon Linux 2023's major
version.

Isolation: ``unshare --mount`` gives the overlay a mount namespace of its own, and bubblewrap then builds the root
from bind mounts and runs the script in new IPC, network, PID and UTS namespaces, as Packer's ``shell``
provisioner would (``chmod +x``, then ``env VARS script``), with the file provisioner's upload already in
``/tmp/runner-fleet``. The host sees nothing of it but the directories under the test's ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
RUNNER_AMI = ROOT / "runner_ami"
INSTALL = RUNNER_AMI / "scripts" / "install.sh"
FAKES = Path(__file__).with_name("fakes.py")
STAGING = "/tmp/runner-fleet"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
# What the fakes answer to, where Amazon Linux keeps it. systemctl's stand-in sits before the real one on PATH.
FAKE_COMMANDS = ("usr/bin/dnf", "usr/bin/curl", "usr/bin/aws", "usr/local/bin/systemctl")
# From this machine's /etc: what its binaries need to run at all (the dynamic linker's cache, Debian's
# alternatives links such as awk) and what useradd reads.
HOST_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "login.defs", "nsswitch.conf")
AL2023_OS_RELEASE = 'NAME="Amazon Linux"\nVERSION="2023"\nID="amzn"\nVERSION_ID="2023"\nPLATFORM_ID="platform:al2023"\n'
BUILD_HOST_FILES = {
    # Generated on the build instance's first boot; every instance must make its own.
    "etc/ssh/ssh_host_ed25519_key": "build host private key\n",
    "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA build-host\n",
    "etc/ssh/ssh_host_ecdsa_key": "build host private key\n",
    "etc/ssh/ssh_host_ecdsa_key.pub": "ecdsa-sha2-nistp256 AAAA build-host\n",
    "etc/machine-id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0\n",
    # cloud-init ran on the build instance; left in place, instances from the image would skip user data.
    "var/lib/cloud/instances/i-0b0123456789abcde/sem/config_write_files": "",
    "var/lib/cloud/data/instance-id": "i-0b0123456789abcde\n",
    "var/log/cloud-init.log": "build instance boot\n",
    "var/log/cloud-init-output.log": "build instance boot\n",
    "root/.bash_history": "sudo -i\n",
    # The distribution's own repository, which dnf's docker and amazon-ecr-credential-helper come from.
    "etc/yum.repos.d/amazonlinux.repo": (
        "[amazonlinux]\nname=Amazon Linux 2023 repository\n"
        "mirrorlist=https://al2023-repos-$awsregion-de612dc2.s3.dualstack.$awsregion.$awsdomain/core/mirrors/"
        "$releasever/$basearch/mirror.list\nenabled=1\ngpgcheck=1\nrepo_gpgcheck=0\n"
        "gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-amazon-linux-2023\n"
    ),
    "home/ec2-user/.bash_history": "sudo -i\n",
    # Amazon Linux 2023's logging settings for cloud-init, which name the output log `cloud-init clean --logs`
    # removes beside its own.
    "etc/cloud/cloud.cfg.d/05_logging.cfg": "output: {all: '| tee -a /var/log/cloud-init-output.log'}\n",
}


def missing_tools() -> list[str]:
    return [tool for tool in ("bwrap", "unshare", "systemctl", "useradd") if shutil.which(tool) is None]


def require_tools() -> None:
    """Fail (under ``make test``, RUNNER_FLEET_REQUIRE_TOOLS=1) or skip when the isolation tools are missing."""
    missing = missing_tools()
    if os.geteuid() != 0:
        missing.append("root")
    if not missing:
        return
    message = f"{', '.join(missing)} missing: `make test` installs bubblewrap and runs as root"
    if os.environ.get("RUNNER_FLEET_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _seed(root: Path, base: Path) -> None:
    for directory in ("etc", "var", "opt", "tmp", "home/ec2-user", "root", "run", "usr", "dev", "proc"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    # Amazon Linux 2023 has a merged /usr, as this machine has.
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")
    for name in HOST_ETC:
        source = Path("/etc") / name
        if source.is_dir():
            shutil.copytree(source, root / "etc" / name, symlinks=True)
        elif source.exists():
            shutil.copy2(source, root / "etc" / name)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nec2-user:x:1000:1000:EC2 Default User:/home/ec2-user:/bin/bash\n"
        "nobody:x:65534:65534:Kernel Overflow User:/:/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nwheel:x:10:ec2-user\nec2-user:x:1000:\nnobody:x:65534:\n")
    (root / "etc/shadow").write_text("root:*LOCK*:19000::::::\nec2-user:!!:19000:0:99999:7:::\nnobody:*:19000::::::\n")
    (root / "etc/gshadow").write_text("root:::\nwheel:::ec2-user\nec2-user:!::\nnobody:::\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o000)
    (root / "etc/os-release").write_text(AL2023_OS_RELEASE)
    (root / "etc/hostname").write_text("ip-10-0-0-10.ec2.internal\n")
    for relative, content in BUILD_HOST_FILES.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    for relative in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ecdsa_key"):
        (root / relative).chmod(0o600)
    (root / "var/lib/cloud/instance").symlink_to("/var/lib/cloud/instances/i-0b0123456789abcde")
    # Packer's file provisioner: the boot script and its unit, uploaded to the staging directory.
    staging = root / STAGING.lstrip("/")
    staging.mkdir(parents=True, mode=0o700)
    for name in ("boot", "runner-fleet-boot.service"):
        shutil.copy(RUNNER_AMI / "files" / name, staging / name)
    # The base layer under /usr: the stand-ins, each answering to the name it is installed under.
    for relative in FAKE_COMMANDS:
        target = base / relative.removeprefix("usr/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/usr/bin/python3\n" + FAKES.read_text())
        target.chmod(0o755)


@dataclass(frozen=True)
class IsolatedRoot:
    """The directories of one build: the image's root, the overlay's layers of /usr, the fakes' journal and the
    stand-in service manager's state (both outside the image)."""

    tmp_path: Path

    @property
    def root(self) -> Path:
        return self.tmp_path / "image"

    @property
    def base(self) -> Path:
        return self.tmp_path / "usr-base"

    @property
    def upper(self) -> Path:
        return self.tmp_path / "usr-upper"

    @property
    def journal(self) -> Path:
        return self.tmp_path / "journal.jsonl"

    @property
    def manager(self) -> Path:
        return self.tmp_path / "manager"

    def create(self) -> None:
        for directory in (self.base, self.upper, self.tmp_path / "usr-work", self.manager):
            directory.mkdir(parents=True)
        self.journal.touch()
        _seed(self.root, self.base)

    def run(self, argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root inside the image: the overlay is mounted on the root's /usr in a mount namespace
        of its own, then bubblewrap binds the root and runs ``argv`` in new IPC, network, PID and UTS namespaces."""
        overlay = f"lowerdir={self.base}:/usr,upperdir={self.upper},workdir={self.tmp_path / 'usr-work'}"
        bwrap = [
            "bwrap",
            "--bind", str(self.root), "/",
            "--bind", str(self.root / "usr"), "/usr",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/run",
            "--bind", str(self.journal), "/fake-journal",
            "--bind", str(self.manager), "/run/fake-systemd",
            "--unshare-ipc", "--unshare-net", "--unshare-pid", "--unshare-uts",
            "--die-with-parent",
            "--clearenv",
            "--setenv", "PATH", PATH,
            "--setenv", "HOME", "/root",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "FAKE_JOURNAL", "/fake-journal",
            *argv,
        ]  # fmt: skip
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t overlay overlay -o "$0" "$1" && shift && exec "$@"',
                   overlay, str(self.root / "usr"), *bwrap]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class ImageBuild:
    """One run of install.sh: its exit status and output, the image's tree, and the commands the fakes saw."""

    status: int
    output: str
    image: IsolatedRoot
    calls: list[dict[str, Any]]
    running: set[str]  # the units the build instance's service manager runs when the script ends

    def path(self, absolute: str) -> Path:
        """Where a path of the image lies on this machine; for /usr, in what the build added or changed there."""
        relative = absolute.lstrip("/")
        if relative.startswith("usr/"):
            return self.image.upper / relative.removeprefix("usr/")
        return self.image.root / relative

    def unit_state(self, unit: str) -> str:
        """``systemctl is-enabled`` of ``unit`` in the image, by the real systemctl (offline, on the unit files)."""
        result = self.image.run(["/usr/bin/systemctl", "--root=/", "is-enabled", unit], timeout=30)
        return (result.stdout.strip() or result.stderr.strip()).splitlines()[-1]

    def commands(self, name: str) -> list[list[str]]:
        return [call["argv"] for call in self.calls if call["command"] == name]


def build_image(tmp_path: Path, environment: dict[str, str], script: Path = INSTALL) -> ImageBuild:
    """Run ``script`` as Packer's provisioner runs it, with ``environment`` as its environment_vars."""
    require_tools()
    image = IsolatedRoot(tmp_path)
    image.create()
    # Packer uploads the script to a temporary path and runs `chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}`.
    shutil.copy(script, image.root / "tmp" / "script_4242.sh")
    variables = [f"{name}={value}" for name, value in environment.items()]
    result = image.run(["/bin/sh", "-c", 'chmod +x "$0"; exec env "$@" "$0"', "/tmp/script_4242.sh", *variables])
    calls = [json.loads(line) for line in image.journal.read_text().splitlines()]
    active = image.manager / "active"
    running = set(active.read_text().split()) if active.exists() else set()
    return ImageBuild(result.returncode, result.stdout + result.stderr, image, calls, running)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)

"""Stand-ins for what an AMI build needs from the network or from Amazon Linux, run inside the isolated root.

One program, installed into the image's base layer under each name it answers to, and run by the root's own
``/usr/bin/python3`` (this machine's, standard library only):

* ``dnf``: Amazon Linux 2023's package manager. Packages come from a small catalogue: ``docker`` and
  ``amazon-ecr-credential-helper`` from the distribution's repositories, ``gitlab-runner`` and
  ``gitlab-runner-helper-images`` only from a repository under ``/etc/yum.repos.d`` whose ``baseurl`` is GitLab's
  package host. For that repository it fetches every ``gpgkey`` URL with ``curl``, as dnf does (librepo), and
  refuses the repository when a key does not download or when the keys it needs are missing: the metadata signing
  key for ``repo_gpgcheck=1``, the package signing key for ``gpgcheck=1`` (dnf.conf(5)). An installed package's
  files are written and its scriptlet run; ``gitlab-runner``'s is :data:`POST_INSTALL`.
* ``curl``: the network. It answers for ``packages.gitlab.com`` as the host does since its move off PackageCloud
  (GitLab blog, "Changes to packages.gitlab.com": the old URL formats' rewrite rules were removed at the end of
  September 2026) and cannot resolve any other host (exit 6).
* ``gitlab-runner``: the binary the package installs. ``--version``, and the service commands of
  kardianos/service's systemd backend, which gitlab-runner uses: ``install`` writes
  ``/etc/systemd/system/gitlab-runner.service``, refusing when it exists ("Init already exists"), then runs
  ``systemctl enable`` and ``systemctl daemon-reload``; ``uninstall`` runs ``systemctl disable`` and removes the
  file; ``start``, ``stop`` and ``status`` ask the service manager. A started service runs ``gitlab-runner run``,
  which writes ``/etc/gitlab-runner/config.toml`` and ``.runner_system_id`` on first start.
* ``post-install``: what the package's scriptlet does (gitlab-runner's
  ``packaging/root/usr/share/gitlab-runner/post-install``): create the ``gitlab-runner`` system user (with the real
  ``useradd``), create ``/etc/gitlab-runner`` (0700), uninstall any old service, ``gitlab-runner install`` the
  service and ``gitlab-runner start`` it.
* ``systemctl``: the service manager's half of systemctl. Everything about unit files (``enable``, ``disable``,
  ``mask``, ``unmask``, ``is-enabled``...) is done by the real ``/usr/bin/systemctl --root=/``, this machine's
  systemd; what needs a running PID 1 (``daemon-reload``, ``start``, ``stop``, ``is-active``, ``--now``) is
  answered here as PID 1 answers, with the unit's state kept in ``/run``.
* ``aws``: the AWS CLI v2 of the base image; ``--version`` only, since everything else needs the network.

Every call appends its argv to ``$FAKE_JOURNAL`` (outside the image), so a test can tell what ran.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Filled in by fake dnf when it installs the gitlab-runner package.
PACKAGE_VERSION: str | None = None

REAL_SYSTEMCTL = "/usr/bin/systemctl"
MANAGER_STATE = Path("/run/fake-systemd/active")
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system")
PACKAGE_HOST = "packages.gitlab.com"
# The GitLab package host's signing keys, at their URLs since the move off PackageCloud (GitLab Runner docs,
# "Install GitLab Runner using the official GitLab repositories"; GitLab docs, "Package signatures": the repository
# metadata key F640 3F65 44A3 8863 DAA0 B6E0 3F01 618A 5131 2F3F at /gpgkey/gpg.key, the runner package key
# 49F16C5CC3A0F81F, and its predecessor 4C80FB51394521E9, under /gpgkey/runner/).
METADATA_KEY = "3F01618A51312F3F"
PACKAGE_KEY = "49F16C5CC3A0F81F"
SERVED_KEYS = {
    "/gpgkey/gpg.key": METADATA_KEY,
    "/gpgkey/runner/49F16C5CC3A0F81F.pub.gpg": PACKAGE_KEY,
    "/gpgkey/runner/4C80FB51394521E9.pub.gpg": "4C80FB51394521E9",
}
RUNNER_REPOSITORY = re.compile(r"https://packages\.gitlab\.com/runner/gitlab-runner/(?P<dist>[a-z0-9._-]+/[0-9.]+)/")
RUNNER_PACKAGE = re.compile(r"(?P<name>gitlab-runner(?:-helper-images)?)-(?P<version>[0-9]+\.[0-9]+\.[0-9]+)-1")
RUNNER_UNIT = "/etc/systemd/system/gitlab-runner.service"


class Failed(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def journal(argv: list[str]) -> None:
    path = os.environ.get("FAKE_JOURNAL")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"command": Path(sys.argv[0]).name, "argv": argv}) + "\n")


def run(*argv: str) -> None:
    """Run a command of the image (on PATH, fakes included); its failure is ours."""
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise Failed(f"{' '.join(argv)}: exit status {result.returncode}", result.returncode)


# -- curl: the network --------------------------------------------------------------------------------------------


def curl(argv: list[str]) -> int:
    output = None
    url = None
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "--output"):
            output = next(args)
        elif arg in ("-H", "--header", "-X", "--request", "--max-time", "--retry"):
            next(args)
        elif not arg.startswith("-"):
            url = arg
    if url is None:
        raise Failed("curl: no URL specified", 2)
    found = re.fullmatch(r"https://([^/]+)(/.*)?", url)
    if found is None or found.group(1) != PACKAGE_HOST:
        host = found.group(1) if found else url
        raise Failed(f"curl: (6) Could not resolve host: {host}", 6)
    path = found.group(2) or "/"
    if path not in SERVED_KEYS:
        raise Failed(f"curl: (22) The requested URL returned error: 404 for {url}", 22)
    body = f"-----BEGIN PGP PUBLIC KEY BLOCK-----\nfake key {SERVED_KEYS[path]}\n-----END PGP PUBLIC KEY BLOCK-----\n"
    if output:
        Path(output).write_text(body)
    else:
        sys.stdout.write(body)
    return 0


# -- dnf ------------------------------------------------------------------------------------------------------------


def _distribution_package(name: str) -> dict[str, str]:
    if name == "docker":
        service = (
            "[Unit]\nDescription=Docker Application Container Engine\nAfter=network-online.target docker.socket\n"
            "Requires=docker.socket\n\n[Service]\nExecStart=/usr/bin/dockerd -H fd://\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        )
        socket = "[Unit]\nDescription=Docker Socket\n\n[Socket]\nListenStream=/run/docker.sock\n\n"
        socket += "[Install]\nWantedBy=sockets.target\n"
        return {
            "/usr/bin/docker": "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n",
            "/usr/bin/dockerd": "#!/bin/sh\nexit 1\n",
            "/usr/lib/systemd/system/docker.service": service,
            "/usr/lib/systemd/system/docker.socket": socket,
        }
    if name == "amazon-ecr-credential-helper":
        return {"/usr/bin/docker-credential-ecr-login": "#!/bin/sh\nexit 1\n"}
    raise Failed(f"No match for argument: {name}\nError: Unable to find a match: {name}")


def _runner_repositories() -> list[tuple[str, configparser.SectionProxy]]:
    repositories = []
    for path in sorted(Path("/etc/yum.repos.d").glob("*.repo")):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        for section in parser.sections():
            repository = parser[section]
            if repository.get("enabled", "1") == "1" and RUNNER_REPOSITORY.match(repository.get("baseurl", "")):
                repositories.append((section, repository))
    return repositories


def _check_keys(name: str, repository: configparser.SectionProxy) -> None:
    """dnf fetches the repository's keys before it trusts its metadata, and refuses it when one fails."""
    keys = set()
    for url in repository.get("gpgkey", "").split():
        fetched = subprocess.run(
            ["curl", "--fail", "--silent", "--show-error", url], capture_output=True, text=True, check=False
        )
        if fetched.returncode != 0:
            raise Failed(
                f"Curl error ({fetched.returncode}): {fetched.stderr.strip()}\n"
                f"Error: Failed to download metadata for repo '{name}': GPG key retrieval failed"
            )
        keys.update(re.findall(r"fake key ([0-9A-F]{16})", fetched.stdout))
    if repository.get("repo_gpgcheck") == "1" and METADATA_KEY not in keys:
        raise Failed(f"Error: Failed to download metadata for repo '{name}': repomd.xml GPG signature verification")
    if repository.get("gpgcheck") == "1" and PACKAGE_KEY not in keys:
        raise Failed("Error: GPG check FAILED: the package's signing key is not among the repository's keys")


def _runner_package(name: str, version: str) -> dict[str, str]:
    repositories = _runner_repositories()
    if not repositories:
        raise Failed(f"No match for argument: {name}-{version}-1\nError: Unable to find a match")
    for section, repository in repositories:
        _check_keys(section, repository)
    if name == "gitlab-runner-helper-images":
        return {f"/usr/lib/gitlab-runner/helper-images/prebuilt-x86_64-{version}.tar.xz": "helper image\n"}
    # The first occurrence is the definition at the top (this line is the second).
    unset, pinned = "PACKAGE_VERSION: str | None = None", f'PACKAGE_VERSION = "{version}"'
    program = Path(__file__).read_text().replace(unset, pinned, 1)
    return {
        "/usr/bin/gitlab-runner": f"#!/usr/bin/python3\n{program}",
        "/usr/share/gitlab-runner/post-install": f"#!/usr/bin/python3\n{program}",
    }


def dnf(argv: list[str]) -> int:
    words = [arg for arg in argv if not arg.startswith("-")]
    if not words:
        raise Failed("dnf: no command given", 1)
    command, specs = words[0], words[1:]
    cache = Path("/var/cache/dnf")
    if command == "clean":
        for entry in cache.glob("*") if cache.is_dir() else ():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "amazonlinux-2023.solv").write_text("repository metadata\n")
    if command == "upgrade":
        return 0
    if command != "install":
        raise Failed(f"No such command: {command}", 1)
    installed = []
    for spec in specs:
        runner = RUNNER_PACKAGE.fullmatch(spec)
        files = _runner_package(runner["name"], runner["version"]) if runner else _distribution_package(spec)
        for path, content in files.items():
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            target.chmod(0o755 if "/bin/" in path or path.endswith("post-install") else 0o644)
        (cache / f"{spec}.rpm").write_text("package\n")
        installed.append(spec)
        if spec == "docker":
            run("groupadd", "--system", "docker")
        if runner and runner["name"] == "gitlab-runner":
            # The package's %post scriptlet; dnf passes its own environment on (GITLAB_RUNNER_DISABLE_SKEL).
            run("/usr/share/gitlab-runner/post-install")
    print("Installed:\n  " + "\n  ".join(installed))
    return 0


# -- the gitlab-runner package ------------------------------------------------------------------------------------


def _unit_file() -> str:
    return (
        "[Unit]\nDescription=GitLab Runner\nConditionFileIsExecutable=/usr/bin/gitlab-runner\n"
        "After=syslog.target network.target\n\n[Service]\nStartLimitInterval=5\nStartLimitBurst=10\n"
        'ExecStart=/usr/bin/gitlab-runner "run" "--config" "/etc/gitlab-runner/config.toml" '
        '"--working-directory" "/home/gitlab-runner" "--service" "gitlab-runner" "--user" "gitlab-runner"\n'
        "Restart=always\nRestartSec=120\nEnvironmentFile=-/etc/sysconfig/gitlab-runner\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def gitlab_runner(argv: list[str]) -> int:
    if argv[:1] in (["--version"], ["-v"]):
        print(f"Version:      {PACKAGE_VERSION}\nGit revision: 0123abcd\nGit branch:   {PACKAGE_VERSION}-stable")
        print("GO version:   go1.24.4 X:cacheprog\nBuilt:        2026-11-20T00:00:00Z\nOS/Arch:      linux/amd64")
        return 0
    command = argv[0] if argv else ""
    unit = Path(RUNNER_UNIT)
    if command == "install":
        if unit.exists() or unit.is_symlink():
            raise Failed(f"FATAL: Failed to install gitlab-runner: Init already exists: {unit}")
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(_unit_file())
        run("systemctl", "enable", "gitlab-runner.service")
        run("systemctl", "daemon-reload")
        return 0
    if command == "uninstall":
        run("systemctl", "disable", "gitlab-runner.service")
        if not unit.exists() and not unit.is_symlink():
            raise Failed(f"FATAL: Failed to uninstall gitlab-runner: remove {unit}: no such file or directory")
        unit.unlink()
        return 0
    if command == "start":
        run("systemctl", "start", "gitlab-runner.service")
        # The service runs `gitlab-runner run`, which writes its config and system id on first start.
        config = Path("/etc/gitlab-runner/config.toml")
        if not config.exists():
            config.write_text("concurrent = 1\ncheck_interval = 0\nshutdown_timeout = 0\n")
            config.chmod(0o600)
        system_id = config.parent / ".runner_system_id"
        if not system_id.exists():
            system_id.write_text("s_0a1b2c3d4e5f\n")
        return 0
    if command == "stop":
        run("systemctl", "stop", "gitlab-runner.service")
        return 0
    if command == "status":
        if not unit.exists():
            raise Failed("FATAL: Failed to get status: the service is not installed")
        active = subprocess.run(["systemctl", "is-active", "--quiet", "gitlab-runner.service"], check=False)
        print("gitlab-runner: Service is running" if active.returncode == 0 else "gitlab-runner: Service has stopped")
        return active.returncode
    raise Failed(f"gitlab-runner: unknown command {command!r} in this stand-in", 2)


def post_install() -> int:
    user = "gitlab-runner"
    if subprocess.run(["id", "-u", user], capture_output=True, check=False).returncode != 0:
        skel = ["--skel", "/dev/null"] if os.environ.get("GITLAB_RUNNER_DISABLE_SKEL", "true") == "true" else []
        run("useradd", "--system", "--shell", "/bin/bash", "--comment", "GitLab Runner", "--create-home", *skel, user)
    Path("/etc/gitlab-runner").mkdir(parents=True, exist_ok=True)
    Path("/etc/gitlab-runner").chmod(0o700)
    for command in (["stop"], ["uninstall"]):
        subprocess.run(["gitlab-runner", *command], capture_output=True, check=False)
    run("gitlab-runner", "install", f"--user={user}", f"--working-directory=/home/{user}")
    subprocess.run(["gitlab-runner", "start"], check=False)
    return 0


# -- systemctl: the service manager's half ------------------------------------------------------------------------

UNIT_FILE_VERBS = {
    "enable",
    "disable",
    "reenable",
    "mask",
    "unmask",
    "is-enabled",
    "preset",
    "link",
    "revert",
    "add-wants",
    "set-default",
    "get-default",
    "list-unit-files",
    "cat",
}


def _active() -> set[str]:
    return set(MANAGER_STATE.read_text().split()) if MANAGER_STATE.exists() else set()


def _set_active(units: set[str]) -> None:
    MANAGER_STATE.parent.mkdir(parents=True, exist_ok=True)
    MANAGER_STATE.write_text("\n".join(sorted(units)))


def _unit_path(unit: str) -> Path | None:
    for directory in UNIT_DIRS:
        path = Path(directory) / unit
        if path.exists() or path.is_symlink():
            return path
    return None


def _start(unit: str) -> None:
    path = _unit_path(unit)
    if path is None:
        raise Failed(f"Failed to start {unit}: Unit {unit} not found.", 5)
    if path.is_symlink() and os.readlink(path) == "/dev/null":
        raise Failed(f"Failed to start {unit}: Unit {unit} is masked.", 1)
    _set_active(_active() | {unit})


def _stop(unit: str) -> None:
    active = _active()
    if unit not in active and _unit_path(unit) is None:
        raise Failed(f"Failed to stop {unit}: Unit {unit} not loaded.", 5)
    _set_active(active - {unit})


def systemctl(argv: list[str]) -> int:
    now = "--now" in argv
    quiet = "--quiet" in argv or "-q" in argv
    words = [arg for arg in argv if not arg.startswith("-")]
    if not words:
        raise Failed("systemctl: this stand-in needs a verb", 1)
    verb, units = words[0], [u if "." in u else f"{u}.service" for u in words[1:]]
    if verb in UNIT_FILE_VERBS:
        options = [arg for arg in argv if arg.startswith("-") and arg != "--now"]
        result = subprocess.run([REAL_SYSTEMCTL, "--root=/", *options, verb, *words[1:]], check=False)
        if result.returncode != 0 or not now:
            return result.returncode
        for unit in units:
            _start(unit) if verb == "enable" else _stop(unit)
        return 0
    if verb == "daemon-reload":
        return 0
    if verb in ("start", "restart"):
        for unit in units:
            _start(unit)
        return 0
    if verb == "stop":
        for unit in units:
            _stop(unit)
        return 0
    if verb == "is-active":
        states = ["active" if unit in _active() else "inactive" for unit in units]
        if not quiet:
            print("\n".join(states))
        return 0 if all(state == "active" for state in states) else 3
    raise Failed(f"systemctl: {verb} is not answered by this stand-in", 1)


def aws(argv: list[str]) -> int:
    if argv == ["--version"]:
        print("aws-cli/2.17.18 Python/3.9.16 Linux/6.1 source/x86_64.amzn.2023")
        return 0
    raise Failed("Could not connect to the endpoint URL: no network in the image build", 255)


COMMANDS = {
    "curl": curl,
    "dnf": dnf,
    "gitlab-runner": gitlab_runner,
    "systemctl": systemctl,
    "aws": aws,
}


def main() -> int:
    name = Path(sys.argv[0]).name
    argv = sys.argv[1:]
    journal(argv)
    try:
        if name == "post-install":
            return post_install()
        return COMMANDS[name](argv)
    except Failed as failed:
        print(failed, file=sys.stderr)
        return failed.status


if __name__ == "__main__":
    sys.exit(main())

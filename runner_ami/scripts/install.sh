#!/bin/bash
# Provisions the runner-fleet runner AMI on the Packer build instance (Amazon Linux 2023, run as root).
#
# Installs Docker, a pinned gitlab-runner from GitLab's signed package repository, the Amazon ECR credential
# helper and the boot script with its systemd unit, then removes everything that belongs to this build host
# rather than to the image: an AMI carries no token, no runner config and no runner system id, and cloud-init
# must run again on every instance launched from it.
#
# Environment (set by the Packer template):
#   GITLAB_RUNNER_VERSION  the gitlab-runner version to install, e.g. 19.5.2
#   RUNNER_FLEET_STAGING   where the file provisioner put `boot` and `runner-fleet-boot.service`
#   GITLAB_RUNNER_REPO_DIST  the distribution path in GitLab's package repository (default amazon/2023)
set -euo pipefail

version=${GITLAB_RUNNER_VERSION:?GITLAB_RUNNER_VERSION is required}
staging=${RUNNER_FLEET_STAGING:?RUNNER_FLEET_STAGING is required}
repo_dist=${GITLAB_RUNNER_REPO_DIST:-amazon/2023}
if [[ ! $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "GITLAB_RUNNER_VERSION must be a release version like 19.5.2, got '$version'" >&2
  exit 1
fi

# Patches within the AMI's Amazon Linux release.
dnf -y upgrade

# Docker and the ECR credential helper come from the Amazon Linux 2023 repositories; the aws CLI (v2) is part of
# the base image. Docker is enabled so it is up when the boot unit starts; it is not started on the build host.
dnf -y install docker amazon-ecr-credential-helper
systemctl enable docker.service
command -v aws >/dev/null
command -v docker-credential-ecr-login >/dev/null

# gitlab-runner from GitLab's package repository, which lists Amazon Linux 2023 among its distributions. Both the
# repository metadata and every package are checked against GitLab's published signing keys (repo_gpgcheck,
# gpgcheck), so dnf refuses anything else. The keys are at their URLs on packages.gitlab.com since its move off
# PackageCloud (the old /runner/gitlab-runner/gpgkey URLs stopped resolving at the end of September 2026): the
# repository metadata key at /gpgkey/gpg.key, the runner package signing keys, current and previous, under
# /gpgkey/runner/ (runner_ami/README.md, "Where the packages come from").
cat >/etc/yum.repos.d/runner_gitlab-runner.repo <<REPO
[runner_gitlab-runner]
name=GitLab Runner
baseurl=https://packages.gitlab.com/runner/gitlab-runner/${repo_dist}/\$basearch
repo_gpgcheck=1
gpgcheck=1
enabled=1
gpgkey=https://packages.gitlab.com/gpgkey/gpg.key
       https://packages.gitlab.com/gpgkey/runner/49F16C5CC3A0F81F.pub.gpg
       https://packages.gitlab.com/gpgkey/runner/4C80FB51394521E9.pub.gpg
sslverify=1
sslcacert=/etc/pki/tls/certs/ca-bundle.crt
metadata_expire=300
REPO
# The package would copy /etc/skel into the gitlab-runner user's home; run-single runs as root and needs none.
GITLAB_RUNNER_DISABLE_SKEL=true dnf -y install \
  "gitlab-runner-${version}-1" "gitlab-runner-helper-images-${version}-1"
# The installed binary must be the version asked for, not whatever the repository resolved.
installed=$(gitlab-runner --version | awk '$1 == "Version:" { print $2 }')
if [[ $installed != "$version" ]]; then
  echo "gitlab-runner reports version '$installed', expected $version" >&2
  exit 1
fi

# Instances run `gitlab-runner run-single` from the boot unit; the package's system service (`gitlab-runner run`
# with /etc/gitlab-runner/config.toml) must never start. The package's post-install made that service with
# `gitlab-runner install`, which writes a regular unit file at /etc/systemd/system/gitlab-runner.service, and
# started it. systemd refuses to mask a unit whose file is there ("already exists"), so the service is stopped and
# disabled, `gitlab-runner uninstall` removes its file, and then the name is masked (a link to /dev/null in its
# place) so that nothing can start it again.
systemctl disable --now gitlab-runner.service
gitlab-runner uninstall
systemctl mask gitlab-runner.service

# The boot script and its unit: installed, not enabled (cloud-init's runcmd starts it after write_files).
install -d -m 0755 /opt/runner-fleet
install -m 0755 "$staging/boot" /opt/runner-fleet/boot
install -m 0644 "$staging/runner-fleet-boot.service" /etc/systemd/system/runner-fleet-boot.service
systemctl daemon-reload
rm -rf "$staging"

# Nothing host-specific in the image: no runner config or system id (each instance is a new runner), no pool
# settings or docker credentials, no SSH host keys or machine id (regenerated on first boot), no package cache.
rm -f /etc/gitlab-runner/config.toml /etc/gitlab-runner/.runner_system_id
rm -f /home/gitlab-runner/.gitlab-runner/config.toml /home/gitlab-runner/.gitlab-runner/.runner_system_id
rm -rf /etc/runner-fleet /run/runner-fleet /root/.docker /root/.ecr
rm -f /etc/ssh/ssh_host_*
truncate -s 0 /etc/machine-id
dnf clean all
rm -rf /var/cache/dnf
# cloud-init runs its per-instance modules (write_files, runcmd) only on an instance it has not seen: forget this
# one, and its logs.
cloud-init clean --logs
rm -f /root/.bash_history /home/ec2-user/.bash_history

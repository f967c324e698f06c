# The runner-fleet runner AMI: Amazon Linux 2023 with Docker, a pinned gitlab-runner, the Amazon ECR credential
# helper and the boot script (/opt/runner-fleet/boot) with its systemd unit. One build per architecture:
#
#   packer init runner_ami/runner-fleet.pkr.hcl
#   packer build -var arch=x86_64 runner_ami/runner-fleet.pkr.hcl
#   packer build -var arch=arm64 runner_ami/runner-fleet.pkr.hcl
#
# Each build adds an entry to runner_ami/manifest.json (custom_data.arch says which), which
# `fleetctl ami publish` turns into the stage's SSM parameter <ami_parameter>/<arch>.

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "CPU architecture of the AMI, as EC2 names it: x86_64 or arm64."

  validation {
    condition     = contains(["x86_64", "arm64"], var.arch)
    error_message = "The arch variable must be x86_64 or arm64."
  }
}

variable "region" {
  type        = string
  default     = env("AWS_REGION")
  description = "Region to build in and register the AMI; defaults to AWS_REGION."

  validation {
    condition     = length(var.region) > 0
    error_message = "Set the region variable or AWS_REGION."
  }
}

variable "instance_types" {
  type        = map(string)
  description = "Build instance type per architecture (the AMI runs on any type of the same architecture)."
  default = {
    x86_64 = "c7i.large"
    arm64  = "c7g.large"
  }
}

variable "gitlab_runner_version" {
  type        = string
  default     = "19.5.2"
  description = "gitlab-runner release installed from GitLab's signed package repository."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.gitlab_runner_version))
    error_message = "The gitlab_runner_version variable must be a release version such as 19.5.2."
  }
}

variable "gitlab_runner_repo_dist" {
  type        = string
  default     = "amazon/2023"
  description = "Distribution path of GitLab's package repository to install gitlab-runner from."
}

variable "root_volume_size" {
  type        = number
  default     = 30
  description = "Root volume size in GiB; launch templates may ask for more, never less."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty uses the default VPC."
}

locals {
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
  ami_tags = {
    Name                             = "runner-fleet-${var.arch}"
    "runner-fleet:component"         = "runner-ami"
    "runner-fleet:arch"              = var.arch
    "runner-fleet:gitlab-runner"     = var.gitlab_runner_version
    "runner-fleet:source-ami"        = "{{ .SourceAMI }}"
    "runner-fleet:source-ami-name"   = "{{ .SourceAMIName }}"
  }
}

source "amazon-ebs" "runner" {
  region          = var.region
  ami_name        = "runner-fleet-${var.arch}-${local.build_time}"
  ami_description = "runner-fleet GitLab runner (gitlab-runner ${var.gitlab_runner_version}, ${var.arch})"
  instance_type   = var.instance_types[var.arch]
  subnet_id       = var.subnet_id
  ssh_username    = "ec2-user"
  # Instances launched from the AMI without metadata options of their own default to IMDSv2 only, with EC2's hop
  # limit for such AMIs, 2 (EC2 API reference, Image.ImdsSupport). runner-fleet's launch templates set their own:
  # hop limit 1, or 2 for a pool that pushes its image (runner_ami/README.md).
  imds_support = "v2.0"

  source_ami_filter {
    filters = {
      # The standard AL2023 image (not minimal, not the ECS-optimised one), the latest release.
      name                = "al2023-ami-2023.*-kernel-*-${var.arch}"
      architecture        = var.arch
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  # The build instance itself answers metadata only to IMDSv2 sessions, one hop.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_type           = "gp3"
    volume_size           = var.root_volume_size
    encrypted             = true
    delete_on_termination = true
  }

  tags          = local.ami_tags
  snapshot_tags = local.ami_tags
  run_tags = {
    Name                     = "runner-fleet-ami-build-${var.arch}"
    "runner-fleet:component" = "runner-ami-build"
  }
}

build {
  name    = "runner-fleet"
  sources = ["source.amazon-ebs.runner"]

  provisioner "shell" {
    inline = ["install -d -m 0700 /tmp/runner-fleet"]
  }

  provisioner "file" {
    sources     = ["${path.root}/files/boot", "${path.root}/files/runner-fleet-boot.service"]
    destination = "/tmp/runner-fleet/"
  }

  provisioner "shell" {
    script          = "${path.root}/scripts/install.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "GITLAB_RUNNER_VERSION=${var.gitlab_runner_version}",
      "GITLAB_RUNNER_REPO_DIST=${var.gitlab_runner_repo_dist}",
      "RUNNER_FLEET_STAGING=/tmp/runner-fleet",
    ]
  }

  post-processor "manifest" {
    output     = "${path.root}/manifest.json"
    strip_path = true
    custom_data = {
      arch                  = var.arch
      gitlab_runner_version = var.gitlab_runner_version
    }
  }
}

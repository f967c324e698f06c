"""Local stand-ins for GitLab and the runner agents, so runner-fleet runs end to end without AWS or GitLab."""

"""Intake: GitLab webhooks authenticated, parsed into typed Job Hooks, de-duplicated and queued."""

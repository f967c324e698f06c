"""Scaling: which pool takes a job, capacity leases, CreateFleet launches, runner tokens and user data."""

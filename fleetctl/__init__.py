"""fleetctl: the runner-fleet operator command line and local sandbox."""

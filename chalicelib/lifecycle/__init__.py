"""Runner lifecycle after launch: interruptions, reconcile's rules and actions, warm windows and invariants.

Each module keeps its decisions pure (facts in, actions out, no I/O and no wall clock) apart from the service
that gathers facts and acts, so tests and the sandbox drive the same decisions on any clock.
"""

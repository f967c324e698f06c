"""The fleet simulator: a team's job history replayed, on a virtual clock, against pool policies.

Every policy decision is the product's own function (pool matching and the idle grace from
:mod:`chalicelib.scaling.policy`, reconcile's rules from :mod:`chalicelib.lifecycle.rules`, warm windows from
:mod:`chalicelib.lifecycle.windows`, the interruption retry from :mod:`chalicelib.lifecycle.interruptions`, the
launch plan from :mod:`chalicelib.scaling.fleet`); this package models only what surrounds them: EC2 boot times and
capacity, spot interruptions, GitLab handing jobs to runners, and the bill. docs/simulate.md describes it.
"""

"""Routing policies: one module per policy, registered by name in `policies.registry`."""

from policies import epsilon_greedy, random_policy  # noqa: F401  (registration side effect)
from policies.base import Arm, Choice, Context, Feedback, Neighbour, Policy, PolicyError, registry

__all__ = ["Arm", "Choice", "Context", "Feedback", "Neighbour", "Policy", "PolicyError", "registry"]

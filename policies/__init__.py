"""Routing policies: one module per policy, registered by name in `policies.registry`."""

from policies import elo, fixed, forc, gradient, hybrid, qlearning, random_policy, thompson, vw  # noqa: F401  (registration side effect)
from policies.base import (
    Arm,
    Choice,
    Context,
    Feedback,
    Neighbour,
    Policy,
    PolicyError,
    Predictions,
    importance_weight,
    registry,
)

__all__ = ["Arm", "Choice", "Context", "Feedback", "Neighbour", "Policy", "PolicyError", "Predictions", "importance_weight", "registry"]

"""Routing policies: one module per policy, registered by name in `policies.registry`.

Importing this package loads only the shared types and the registry; a policy's module (and what it
needs, such as Vowpal Wabbit) is imported when the policy is first created.
"""

from policies.base import (
    PREDICTED_POLICIES,
    Arm,
    Choice,
    Context,
    Feedback,
    HistoryPrompt,
    Neighbour,
    Policy,
    PolicyError,
    Predictions,
    importance_weight,
    registry,
)

__all__ = [
    "PREDICTED_POLICIES", "Arm", "Choice", "Context", "Feedback", "HistoryPrompt", "Neighbour", "Policy", "PolicyError", "Predictions",
    "importance_weight", "registry",
]

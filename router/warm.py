"""Warm starts in the service: imported history (`llm-router import`) seeds the policies that start from
nothing, so a deployment with history does not route its first queries blind.

At start, every policy without a snapshot learns from the imported outcomes of the configured backends
(`Policy.warm_start`: every backend's quality on each prompt), before the log is replayed into it. A
policy restored from a snapshot already holds its warm start (the count rides in the snapshot), so it is
never warm-started twice. Logged rewards are left out here: they reach every policy through the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
from sqlalchemy import Engine

from backends.client import estimate_tokens
from policies import HistoryPrompt, Policy
from router.budget import predict_cost
from router.config import BackendConfig
from router.history import imported_outcomes
from router.predictors.data import by_prompt

log = logging.getLogger("llm_router")


def history_prompts(db: Engine, backends: Sequence[BackendConfig], embed: Callable[[list[str]], np.ndarray]) -> list[HistoryPrompt]:
    """The imported history as policies see queries: each prompt embedded with `embed` (the service's
    embedder), its tokens estimated as the service estimates a live prompt's, every configured backend's
    mean quality on it, and its cost at the backend's prices where the history recorded an answer length."""
    prices = {b.name: b for b in backends}
    prompts = by_prompt(imported_outcomes(db, list(prices)))
    if not prompts:
        return []
    vectors = embed([prompt.text for prompt in prompts])
    history = []
    for prompt, vector in zip(prompts, vectors, strict=True):
        tokens = estimate_tokens(prompt.text)
        costs = {
            name: predict_cost(prices[name].price_per_1m_input_tokens_usd, prices[name].price_per_1m_output_tokens_usd, tokens, length)
            for name, length in prompt.output_tokens.items()
        }
        history.append(HistoryPrompt(np.asarray(vector), tokens, prompt.qualities, costs or None))
    return history


def warm_start(policies: Mapping[str, Policy], fresh: Collection[str], db: Engine, backends: Sequence[BackendConfig],
               embed: Callable[[list[str]], np.ndarray]) -> dict[str, int]:
    """Warm-start the policies named in `fresh` (those without a snapshot) from the imported history;
    returns the prompts each used. The history is read and embedded only when some policy needs it."""
    names = sorted(name for name in fresh if name in policies)
    if not names:
        return {}
    history = history_prompts(db, backends, embed)
    if not history:
        return {}
    used = {}
    for name in names:
        try:
            used[name] = policies[name].warm_start(history)
        except Exception:  # one policy that cannot learn from the history stops neither the others nor the start
            log.exception("policy %s failed to warm-start", name)
    log.info("warm start from %d imported prompts: %s", len(history), used)
    return used

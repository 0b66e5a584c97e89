"""Off-the-shelf bandit libraries as peers of our router, replayed on exactly the stream it sees.

What a user would run instead of our router: MABWiser's LinUCB and LinTS and river's LinUCBDisjoint
(contextual, on the prompt embedding), and river's UCB and EpsilonGreedy (one arm per model, no context).
Each pass follows `router.replay.passes.replay_pass`: the order is `default_rng(seed).permutation(n)`, and each
step the peer sees the prompt's embedding, picks a model and is then told only that model's reward.

Configuration, kept as close to each library's defaults as the task allows:
- Reward: `quality - cost_weight * cost_usd / cost_scale`, with `cost_scale` the dataset's mean cost per
  query over all models, so `cost_weight` trades quality for cost as the budget knob of a sweep.
- Context: on the raw 384-d embedding MABWiser is too slow for 6k-prompt passes: each LinUCB/LinTS
  update deep-copies every arm's 384x384 matrices and inverts one (~11 ms), and each LinTS choice
  draws a 384-d Gaussian per arm (~13 ms for 9 arms), minutes per pass. Every contextual peer
  therefore gets the same `CONTEXT_DIMS` principal components of the file's embeddings (an unsupervised
  projection fitted once on the prompts' embeddings, never on outcomes) plus a constant feature, since
  none of these linear models fits an intercept (Li et al. 2010 include one too). `dims=None` keeps all 384.
- Cold start: MABWiser needs a fit before predicting, so it is fitted on no data (prior only: every arm
  scores the same and LinUCB's bonus then makes it try each arm); river needs nothing.
- river's UCB and EpsilonGreedy have no default for `delta` / `epsilon`: UCB uses `delta=1` (UCB1)
  with river's `TargetStandardScaler` on the reward, as UCB's docstring recommends, because with a
  cost weight the reward is no longer in [0, 1]; EpsilonGreedy uses the textbook `epsilon=0.1`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from mabwiser.mab import MAB, LearningPolicy
from river import bandit, preprocessing

from router.progress import ticking
from router.replay.data import Dataset
from router.replay.passes import PassResult

CONTEXT_DIMS = 64


class Peer(Protocol):
    def choose(self, x: np.ndarray) -> str: ...

    def learn(self, x: np.ndarray, arm: str, reward: float) -> None: ...


class MABWiserPeer:
    """A MABWiser contextual policy, fed one sample at a time as the stream arrives."""

    def __init__(self, policy: object, arms: list[str], seed: int, n_features: int) -> None:
        self.mab = MAB(arms, policy, seed=seed)
        self.mab.fit([], [], np.empty((0, n_features)))

    def choose(self, x: np.ndarray) -> str:
        return self.mab.predict(x[None, :])

    def learn(self, x: np.ndarray, arm: str, reward: float) -> None:
        self.mab.partial_fit([arm], [reward], x[None, :])


class RiverContextualPeer:
    """A river contextual policy; river takes features as a dict."""

    def __init__(self, policy: bandit.base.ContextualPolicy, arms: list[str]) -> None:
        self.policy, self.arms = policy, arms

    def choose(self, x: np.ndarray) -> str:
        return self.policy.pull(self.arms, context=dict(enumerate(x.tolist())))

    def learn(self, x: np.ndarray, arm: str, reward: float) -> None:
        self.policy.update(arm, dict(enumerate(x.tolist())), reward)


class RiverPeer:
    """A river context-free policy: the embedding is ignored."""

    def __init__(self, policy: bandit.base.Policy, arms: list[str]) -> None:
        self.policy, self.arms = policy, arms

    def choose(self, x: np.ndarray) -> str:
        return self.policy.pull(self.arms)

    def learn(self, x: np.ndarray, arm: str, reward: float) -> None:
        self.policy.update(arm, reward)


# name -> factory(arms, seed, n_features)
PEERS: dict[str, Callable[[list[str], int, int], Peer]] = {
    "mabwiser-linucb": lambda arms, seed, d: MABWiserPeer(LearningPolicy.LinUCB(), arms, seed, d),
    "mabwiser-lints": lambda arms, seed, d: MABWiserPeer(LearningPolicy.LinTS(), arms, seed, d),
    "river-linucb-disjoint": lambda arms, seed, d: RiverContextualPeer(bandit.LinUCBDisjoint(seed=seed), arms),
    "river-ucb": lambda arms, seed, d: RiverPeer(
        bandit.UCB(delta=1.0, reward_scaler=preprocessing.TargetStandardScaler(None), seed=seed), arms
    ),
    "river-epsilon-greedy": lambda arms, seed, d: RiverPeer(bandit.EpsilonGreedy(epsilon=0.1, seed=seed), arms),
}


def context_features(vectors: np.ndarray, dims: int | None = CONTEXT_DIMS) -> np.ndarray:
    """A constant feature (the intercept the linear peers lack) and the top `dims` principal components.

    The projection only rotates and truncates the embedding space; it is fitted on embeddings alone.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if dims is not None:
        centred = vectors - vectors.mean(axis=0)
        _, components = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        vectors = centred @ components[:, ::-1][:, :dims]
    return np.hstack([np.ones((len(vectors), 1)), vectors])


def peer_pass(
    dataset: Dataset,
    vectors: np.ndarray,
    name: str,
    seed: int,
    cost_weight: float = 0.0,
    dims: int | None = CONTEXT_DIMS,
) -> PassResult:
    """One online pass of peer `name`, in the same order and with the same bandit feedback as `replay_pass`."""
    arms = dataset.model_names
    # mean cost per query over all models (1 when all are free, where the reward is the quality alone)
    cost_scale = float(np.mean([p.outcomes[m].cost_usd for p in dataset.prompts for m in arms])) or 1.0
    features = context_features(vectors, dims)
    peer = PEERS[name](arms, seed, features.shape[1])
    qualities, costs, timings, choices = [], [], [], []
    order = np.random.default_rng(seed).permutation(len(dataset.prompts))
    for index in ticking(order.tolist(), f"{name}, seed {seed}"):
        x = features[index]
        started = time.perf_counter()
        arm = peer.choose(x)
        timings.append((time.perf_counter() - started) * 1000)
        outcome = dataset.prompts[index].outcomes[arm]
        peer.learn(x, arm, outcome.quality - cost_weight * outcome.cost_usd / cost_scale)
        qualities.append(outcome.quality)
        costs.append(outcome.cost_usd)
        choices.append(arm)
    return PassResult(np.array(qualities), np.array(costs), np.array(timings), choices, order)

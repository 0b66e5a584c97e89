"""The pure engine: off-policy estimates checked by hand, failover credit, pacing of running calls,
isolation of a policy that fails to learn, and `build_engine` honouring the config."""

import numpy as np
import pytest

from policies import Arm, registry
from router.budget import BudgetPacer, OutputLengthModel
from router.config import load_config
from router.engine import DecisionRecord, RoutingEngine, build_engine
from router.memory import Memory
from tests.conftest import backend_table, write_config

ARMS = [Arm("a", 1.0, 2.0, 1e-5), Arm("b", 2.0, 4.0, 2e-5)]
DIM = 8


def _engine(*names: str, pacer: BudgetPacer | None = None, **options) -> RoutingEngine:
    policies = {name: registry.create(name, seed=1, **options.get(name, {})) for name in names}
    return RoutingEngine(policies, names[0], Memory(DIM), pacer or BudgetPacer(), OutputLengthModel())


def _vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _record(decision_id, policy, chosen, propensity, shadow, backend=None) -> DecisionRecord:
    choices = {name: max(p, key=p.get) for name, p in shadow.items()}
    return DecisionRecord(decision_id, policy, chosen, propensity, 10, list(ARMS), [], 0.0, 1.0, shadow, choices, backend=backend)


def test_ips_and_snips_on_a_three_decision_log_match_the_hand_computed_values():
    engine = _engine("thompson", "random", "fixed", fixed={"backend": "b"})
    uniform, always_b = {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0}
    log = [
        (_record("d1", "random", "a", 0.5, {"random": uniform, "fixed": always_b, "thompson": uniform}), 1.0),
        (_record("d2", "random", "b", 0.5, {"random": uniform, "fixed": always_b, "thompson": uniform}), 0.4),
        (_record("d3", "thompson", "b", 0.2, {"random": uniform, "fixed": always_b, "thompson": {"a": 0.8, "b": 0.2}}), 0.9),
    ]
    for i, (record, reward) in enumerate(log):
        engine.learn(record, _vector(i), reward)
    shadow = engine.stats()["shadow"]
    # fixed (always b): ratios 0/0.5, 1/0.5, 1/0.2 -> IPS (0 + 0.8 + 4.5) / 3, SNIPS 5.3 / 7
    assert shadow["fixed"]["ips"] == pytest.approx(5.3 / 3) and shadow["fixed"]["snips"] == pytest.approx(5.3 / 7)
    # random: ratios 1, 1, 0.5/0.2 -> IPS (1 + 0.4 + 2.25) / 3, SNIPS 3.65 / 4.5
    assert shadow["random"]["ips"] == pytest.approx(3.65 / 3) and shadow["random"]["snips"] == pytest.approx(3.65 / 4.5)
    # thompson logged d3 itself: ratios 1, 1, 1 -> both the plain mean
    assert shadow["thompson"]["ips"] == pytest.approx(2.3 / 3) and shadow["thompson"]["snips"] == pytest.approx(2.3 / 3)
    assert (shadow["fixed"]["matching_decisions"], shadow["random"]["matching_decisions"]) == (2, 1)  # random "chose" a each time


def test_a_failed_over_decision_is_learned_for_the_answering_backend_with_its_reaching_probability():
    record = _record("d1", "thompson", "a", 0.3, {"thompson": {"a": 0.3, "b": 0.7}}, backend="b")
    assert record.failed_over and record.answered_by == "b"
    assert record.learning_propensity == pytest.approx(1.0), "b was reached by choosing b (0.7) or a (0.3)"
    record = _record("d2", "thompson", "a", 0.3, {"thompson": {"a": 0.3, "b": 0.5, "c": 0.2}}, backend="b")
    assert record.learning_propensity == pytest.approx(0.8)

    engine = _engine("thompson", "random")
    seen = []
    for policy in engine.policies.values():
        original = policy.learn
        policy.learn = lambda feedback, original=original: (seen.append((feedback.arm, feedback.propensity)), original(feedback))
    engine.learn(record, _vector(0), 1.0)
    assert seen == [("b", pytest.approx(0.8))] * 2, "every policy hears of b, with b's probability"
    stats = engine.stats()["shadow"]
    assert (stats["thompson"]["rewards"], stats["thompson"]["excluded_failover"]) == (0, 1)


def test_every_policy_learns_although_one_raises():
    engine = _engine("thompson", "qlearning", "vw", "random")

    def broken(feedback):
        raise RuntimeError("broken")

    engine.policies["qlearning"].learn = broken
    for i in range(3):
        record = engine.decide(f"d{i}", i, _vector(i), 10, [Arm("a", 1.0, 2.0), Arm("b", 2.0, 4.0)])
        engine.record_outcome(record.decision_id, record.chosen, 1e-5, 5)
        engine.learn(record, _vector(i), 0.5)
    stats = engine.stats()
    assert stats["learn_errors"] == {"thompson": 0, "qlearning": 3, "vw": 0, "random": 0}
    for name in ("thompson", "vw", "random"):
        assert sum(a["feedback"] for a in engine.policies[name].stats()["arms"].values()) == 3, name
    assert stats["shadow"]["qlearning"]["rewards"] == 3
    assert engine.memory.entry("d2").reward == 0.5


def test_pacing_counts_a_running_call_so_a_second_one_takes_the_cheap_backend():
    engine = _engine("fixed", pacer=BudgetPacer(target_usd_per_query=1.0), fixed={"backend": "dear"})
    engine.output_lengths = OutputLengthModel(default_tokens=100)
    dear, cheap = Arm("dear", 0.0, 9000.0), Arm("cheap", 0.0, 2000.0)  # 0.9 and 0.2 USD per answer
    first = engine.decide("d1", 1, _vector(1), 10, [dear, cheap])
    assert first.chosen == "dear" and first.predicted_cost_usd == pytest.approx(0.9)
    second = engine.decide("d2", 2, _vector(2), 10, [dear, cheap])
    assert second.chosen == "cheap", "0.9 is already committed to the running call: the dear one no longer fits"
    engine.record_failure("d1")
    engine.record_failure("d2")
    assert engine.decide("d3", 3, _vector(3), 10, [dear, cheap]).chosen == "dear"


def test_build_engine_takes_the_whole_config(tmp_path):
    extra = ('policies = ["vw", "thompson"]\ndefault_policy = "thompson"\n[policy_options.vw]\nepsilon = 0.2\nexploration = "epsilon"\n'
             '[embedder]\nneighbours = 7\n[budget]\ntarget_usd_per_hour = 2.0\npacing_step = 0.5\nmax_carryover_hours = 3\n')
    config = load_config(write_config(tmp_path / "c.toml", "sqlite://", backend_table("a", 1, 1, 1), extra), environ={})
    engine = build_engine(config, DIM)
    assert list(engine.policies) == ["thompson", "vw"] and engine.active == "thompson"
    assert engine.neighbours == 7
    assert (engine.pacer.target_usd_per_hour, engine.pacer.step, engine.pacer.max_carryover_hours) == (2.0, 0.5, 3.0)
    assert "--epsilon 0.2" in engine.policies["vw"].stats()["internals"]["arguments"]
    solo = build_engine(config, DIM, policies=["vw"])
    assert list(solo.policies) == ["vw"] and solo.active == "vw"

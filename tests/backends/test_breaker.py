"""The circuit breaker's state machine, on a clock the test moves by hand."""

import pytest

from backends.breaker import BreakerSettings, CircuitBreaker, failure_kind


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _breaker(clock: Clock, **settings) -> CircuitBreaker:
    return CircuitBreaker(BreakerSettings(**settings), clock)


def test_closed_lets_calls_through_and_one_failure_opens_by_default(clock):
    breaker = _breaker(clock)
    assert breaker.state == "closed" and breaker.available
    assert breaker.try_acquire() and breaker.try_acquire()  # closed: no limit
    breaker.record_failure("backend a: unreachable (ConnectError: refused)")
    assert breaker.state == "open" and not breaker.available and not breaker.try_acquire()
    assert breaker.retry_in_s() == pytest.approx(5.0)


def test_threshold_counts_consecutive_failures_and_success_resets_them(clock):
    breaker = _breaker(clock, failure_threshold=3)
    breaker.record_failure("x: HTTP 500: boom")
    breaker.record_failure("x: HTTP 500: boom")
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure("x: HTTP 500: boom")
    breaker.record_failure("x: HTTP 500: boom")
    assert breaker.state == "closed"
    breaker.record_failure("x: HTTP 500: boom")
    assert breaker.state == "open" and breaker.failures == 5


def test_open_becomes_half_open_after_the_period_and_allows_one_probe(clock):
    breaker = _breaker(clock, open_s=5.0)
    breaker.record_failure("x: timed out after 2s")
    clock.advance(4.99)
    assert breaker.state == "open" and not breaker.try_acquire()
    clock.advance(0.01)
    assert breaker.state == "half_open" and breaker.available
    assert breaker.available  # looking takes nothing
    assert breaker.try_acquire()  # the probe
    assert breaker.state == "half_open" and not breaker.available
    assert not breaker.try_acquire() and not breaker.try_acquire()  # one probe at a time
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    assert breaker.try_acquire() and breaker.try_acquire()


def test_failed_probes_double_the_period_up_to_the_cap(clock):
    breaker = _breaker(clock, open_s=5.0, max_open_s=30.0)
    breaker.record_failure("x: HTTP 503: overloaded")
    periods = []
    for _ in range(5):
        periods.append(breaker.open_period_s)
        clock.advance(breaker.retry_in_s())
        assert breaker.try_acquire()
        breaker.record_failure("x: HTTP 503: overloaded")
        assert breaker.state == "open"
    assert periods == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert breaker.retry_in_s() == pytest.approx(30.0)
    clock.advance(30.0)
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.open_period_s == 5.0  # the next opening starts over
    breaker.record_failure("x: HTTP 503: overloaded")
    assert breaker.retry_in_s() == pytest.approx(5.0)
    assert breaker.times_opened == 7  # the first, five failed probes, the one after closing


def test_release_frees_the_probe_slot_without_a_verdict(clock):
    breaker = _breaker(clock)
    breaker.record_failure("x: timed out after 2s")
    clock.advance(5.0)
    assert breaker.try_acquire() and not breaker.try_acquire()
    breaker.release()
    assert breaker.state == "half_open" and breaker.available
    assert breaker.try_acquire() and not breaker.try_acquire()
    breaker.release()
    breaker.release()  # twice, or in closed: harmless
    assert breaker.state == "half_open" and breaker.open_period_s == 5.0


def test_concurrent_requests_in_half_open_only_one_probes(clock):
    breaker = _breaker(clock)
    breaker.record_failure("x: timed out after 2s")
    clock.advance(6.0)
    granted = [breaker.try_acquire() for _ in range(10)]
    assert granted.count(True) == 1 and granted[0]


def test_success_while_open_changes_nothing(clock):
    """A call that began before the breaker opened and answered afterwards does not close it."""
    breaker = _breaker(clock)
    assert breaker.try_acquire() and breaker.try_acquire()
    breaker.record_failure("x: unreachable (ConnectError: refused)")
    clock.advance(1.0)
    breaker.record_success()
    assert breaker.state == "open" and breaker.retry_in_s() == pytest.approx(4.0)


def test_failure_while_open_restarts_the_period_without_doubling(clock):
    breaker = _breaker(clock)
    breaker.record_failure("x: timed out after 2s")
    clock.advance(3.0)
    breaker.record_failure("x: timed out after 2s")  # a second call that was already in flight
    assert breaker.state == "open" and breaker.open_period_s == 5.0 and breaker.retry_in_s() == pytest.approx(5.0)
    assert breaker.times_opened == 1


def test_failed_health_check_opens_at_once_and_keeps_it_open_while_failing(clock):
    breaker = _breaker(clock, failure_threshold=3)
    breaker.record_health_failure("/health answered HTTP 500")
    assert breaker.state == "open"
    for _ in range(10):  # checks every 2 s, more often than open_s: never half-open, never doubled
        clock.advance(2.0)
        breaker.record_health_failure("/health answered HTTP 500")
        assert breaker.state == "open" and breaker.open_period_s == 5.0
    assert breaker.failures_by_kind == {"health": 11}


def test_passed_health_check_never_closes_but_the_next_request_probes(clock):
    breaker = _breaker(clock)
    breaker.record_health_failure("ConnectError: refused")
    clock.advance(2.0)
    breaker.record_health_success()
    assert breaker.state == "open" and not breaker.try_acquire()  # not early
    clock.advance(3.0)
    breaker.record_health_success()
    assert breaker.state == "half_open"
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state == "closed"


def test_a_backend_that_comes_back_is_forgiven_the_doubled_period(clock):
    breaker = _breaker(clock, open_s=5.0, max_open_s=60.0)
    breaker.record_failure("x: timed out after 2s")
    for _ in range(4):  # failed probes: 10, 20, 40, 60 s
        clock.advance(breaker.retry_in_s())
        assert breaker.try_acquire()
        breaker.record_failure("x: timed out after 2s")
    assert breaker.open_period_s == 60.0
    clock.advance(1.0)
    breaker.record_health_failure("ConnectError: refused")  # still down
    clock.advance(6.0)
    breaker.record_health_success()  # back: the wait is open_s from the last opening, not 60 s
    assert breaker.state == "half_open" and breaker.open_period_s == 5.0
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state == "closed"


def test_passing_health_checks_do_not_forgive_a_backend_that_fails_requests(clock):
    breaker = _breaker(clock, open_s=5.0)
    breaker.record_health_success()
    breaker.record_failure("x: HTTP 500: engine dead")
    clock.advance(5.0)
    assert breaker.try_acquire()
    breaker.record_failure("x: HTTP 500: engine dead")
    breaker.record_health_success()
    assert breaker.state == "open" and breaker.open_period_s == 10.0 and breaker.retry_in_s() == pytest.approx(10.0)


def test_health_failure_during_a_probe_reopens(clock):
    breaker = _breaker(clock)
    breaker.record_failure("x: timed out after 2s")
    clock.advance(5.0)
    assert breaker.try_acquire()
    breaker.record_health_failure("/health answered HTTP 503")
    assert breaker.state == "open" and breaker.open_period_s == 5.0


def test_describe_counts_failures_by_kind(clock):
    breaker = _breaker(clock, failure_threshold=10)
    breaker.record_failure("backend a: timed out after 120s")
    breaker.record_failure("backend a: unreachable (ConnectError: [Errno 111] Connection refused)")
    breaker.record_failure("backend a: HTTP 502: Bad Gateway")
    breaker.record_failure("backend a: answered with invalid JSON")
    breaker.record_failure("something odd", kind="custom")
    breaker.record_health_failure("/health answered HTTP 500")
    clock.advance(1.5)
    info = breaker.describe()
    assert info["state"] == "open" and not info["available"]
    assert info["failures"] == 6 and info["consecutive_failures"] == 6
    assert info["failures_by_kind"] == {
        "timeout": 1,
        "connection": 1,
        "http_5xx": 1,
        "bad_response": 1,
        "custom": 1,
        "health": 1,
    }
    assert info["last_error"] == "/health answered HTTP 500"
    assert info["opened_s_ago"] == pytest.approx(1.5) and info["retry_in_s"] == pytest.approx(3.5)
    assert info["times_opened"] == 1 and info["probe_in_flight"] is False
    breaker.reset()
    info = breaker.describe()
    assert info["state"] == "closed" and info["retry_in_s"] is None and info["opened_s_ago"] is None
    assert info["failures"] == 6 and info["consecutive_failures"] == 0


def test_failure_kinds():
    assert failure_kind("backend b: timed out after 5s") == "timeout"
    assert failure_kind("ReadTimeout: ") == "timeout"
    assert failure_kind("backend b: unreachable (RemoteProtocolError: closed)") == "connection"
    assert failure_kind("backend b: HTTP 500: oops") == "http_5xx"
    assert failure_kind("backend b: HTTP 404: no") == "other"


def test_settings_are_checked():
    with pytest.raises(ValueError):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerSettings(open_s=10.0, max_open_s=5.0)
    with pytest.raises(ValueError):
        BreakerSettings(open_s=0.0)

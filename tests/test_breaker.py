"""Circuit breakers (router/breaker.py): explicit closed / open / half-open states, and asking
about a worker never costs another worker its trial request."""

from router.breaker import CLOSED, HALF_OPEN, OPEN, Breakers


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def opened(b: Breakers, *wids: str) -> None:
    for w in wids:
        for _ in range(b.threshold):
            b.failure(w)


def test_opens_after_threshold_then_half_open_trial_closes_it():
    clock = Clock()
    b = Breakers(threshold=3, cooldown=5.0, clock=clock)
    b.failure("a")
    b.failure("a")
    assert b.state("a") == CLOSED and b.allows("a")
    b.failure("a")
    assert b.state("a") == OPEN and not b.allows("a")
    clock.t += 5.0
    assert b.state("a") == HALF_OPEN and b.allows("a")
    b.begin("a")  # the one trial
    assert not b.allows("a"), "a second request must wait for the trial's outcome"
    b.success("a")
    assert b.state("a") == CLOSED and b.allows("a") and b.states() == {}


def test_failed_trial_reopens_for_a_full_cooldown():
    clock = Clock()
    b = Breakers(threshold=1, cooldown=5.0, clock=clock)
    b.failure("a")
    clock.t += 5.0
    b.begin("a")
    b.failure("a")
    assert b.state("a") == OPEN
    clock.t += 4.9
    assert not b.allows("a")
    clock.t += 0.1
    assert b.allows("a")


def test_asking_never_rearms_the_cooldown_of_a_worker_not_chosen():
    # Two open breakers past their cooldown: the router asks about both, sends to one. The other
    # keeps its trial: it is still allowed on the next request. (The old breaker re-armed every
    # breaker it was asked about, so the worker the picker did not choose lost its trial.)
    clock = Clock()
    b = Breakers(threshold=1, cooldown=5.0, clock=clock)
    opened(b, "a", "b")
    clock.t += 5.0
    assert b.allows("a") and b.allows("b")
    b.begin("a")
    assert b.allows("b") and b.state("b") == HALF_OPEN
    for _ in range(10):
        b.allows("b")
    assert b.allows("b")


def test_a_trial_whose_client_left_may_be_retried():
    clock = Clock()
    b = Breakers(threshold=1, cooldown=1.0, clock=clock)
    b.failure("a")
    clock.t += 1.0
    b.begin("a")
    assert not b.allows("a")
    b.release("a")  # neither success nor failure
    assert b.allows("a")


def test_forget_drops_workers_that_left():
    b = Breakers(threshold=1)
    opened(b, "a", "b")
    b.forget({"b"})
    assert b.states() == {"b": 1} and b.state("a") == CLOSED

"""Exactly-once evaluation claims, under real concurrency."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from palm.store.ledger import EvalLedger


def _contend(directory: str, steps: list[int], start: float, queue) -> None:
    ledger = EvalLedger(directory)
    while time.time() < start:  # everyone starts at the same moment
        pass
    won = [s for s in steps if ledger.claim(s, owner=str(os.getpid()))]
    for s in won:
        ledger.record(s, {"owner": os.getpid()})
    queue.put(won)


def test_each_step_is_claimed_by_exactly_one_of_many_processes(tmp_path):
    steps = list(range(0, 200, 5))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), steps, start, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    wins = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = sorted(s for w in wins for s in w)
    assert claimed == steps  # every step once, none twice
    ledger = EvalLedger(tmp_path)
    assert sorted(ledger.results()) == steps and ledger.pending(steps) == []


def test_stale_claims_are_taken_over_and_released_ones_reclaimed(tmp_path):
    ledger = EvalLedger(tmp_path, stale_after=0.2)
    assert ledger.claim(10, "a") and not ledger.claim(10, "b")
    time.sleep(0.3)
    assert ledger.claim(10, "b")  # a died without a result
    ledger.release(10)
    assert ledger.claim(10, "c")
    ledger.record(10, {"loss": 1.0})
    assert not ledger.claim(10, "d") and ledger.result(10) == {"loss": 1.0}


def test_the_owner_of_a_claim_gets_it_again(tmp_path):
    """A flow run resumed after its process died holds its claims still: it goes on with them."""
    ledger = EvalLedger(tmp_path)
    assert ledger.claim(5, "run-1") and ledger.claim(5, "run-1")
    assert not ledger.claim(5, "run-2")
    ledger.record(5, {"loss": 1.0})
    assert not ledger.claim(5, "run-1")  # recorded: nobody evaluates it again

"""The stop policy shared by ``broker run`` and ``broker serve`` (K2)."""

from __future__ import annotations

import asyncio
import os
import signal

from broker.jobs.signals import ECHO_S, StopSignals, caught_early, installed


class _Recorder:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, str]] = []

    def policy(self) -> StopSignals:
        return StopSignals(
            lambda sig: self.calls.append(("graceful", sig.name)),
            lambda sig: self.calls.append(("now", sig.name)),
            monotonic=lambda: self.now,
        )


class TestStopSignals:
    def test_second_signal_stops_at_once_whatever_the_gap(self) -> None:
        """K2: a second signal 0.3 s after the first (under the old 1 s echo rule) stops now."""
        for gap in (0.1, 0.3, 0.9, 1.5, 60.0):
            rec = _Recorder()
            policy = rec.policy()
            policy(signal.SIGTERM)
            rec.now += gap
            policy(signal.SIGTERM)
            assert rec.calls == [("graceful", "SIGTERM"), ("now", "SIGTERM")], gap

    def test_simultaneous_copy_is_an_echo(self) -> None:
        """The same stop delivered twice at once (terminal + uv's forwarded copy) drains only."""
        rec = _Recorder()
        policy = rec.policy()
        policy(signal.SIGINT)
        rec.now += ECHO_S / 2
        policy(signal.SIGINT)
        assert rec.calls == [("graceful", "SIGINT")]
        rec.now += 0.5
        policy(signal.SIGTERM)
        assert rec.calls[-1] == ("now", "SIGTERM")


class TestCaughtEarly:
    async def test_signal_before_the_handler_is_replayed_and_after_is_dropped(self) -> None:
        """A SIGTERM before the run's handler reaches it; one after it is gone never kills."""
        calls: list[signal.Signals] = []
        with caught_early():
            os.kill(os.getpid(), signal.SIGTERM)  # still starting: kept, not fatal
            with installed(calls.append):
                await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)  # finishing: dropped
            await asyncio.sleep(0.01)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

"""The worker transport's wake-ups of Celery's event loop (worker/transport.py), in-process with a recording
stand-in for the loop. The channels' waits themselves, with redis-server and workers, are in
tests/integration/test_idle_workers.py."""

from worker.transport import Transport, _next_round


class RecordingLoop:
    def __init__(self):
        self.timers: list[float] = []

    def call_later(self, seconds, callback):
        assert callback is _next_round
        self.timers.append(seconds)


def test_every_wake_up_gets_a_timer_of_its_own():
    """A round due sooner does not stand in for a later wake-up: that round may find the channel still idle,
    and a timer set from inside it would not shorten the loop's sleep (the channel slept up to a second)."""
    transport = Transport.__new__(Transport)  # only the loop is needed: no broker connection
    transport.hub = RecordingLoop()
    transport.wake_after(0.003)
    transport.wake_after(0.010)
    transport.wake_after(0.0)
    assert transport.hub.timers == [0.003, 0.010, 0.0]

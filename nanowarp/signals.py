"""
Stopping on SIGINT / SIGTERM: a signal only raises a flag (`stop_requested`); a training loop looks
at it after each step and stops there, saving its state (`Interrupted`). A scheduler sends SIGTERM
before it kills a job; Ctrl-C sends SIGINT. Worker processes and torchrun ranks are told by their
parent (nanowarp/jobs/parallel.py).
"""

import contextlib
import os
import signal
import sys


class Interrupted(Exception):
    """The job stopped at the end of a step because it got SIGINT or SIGTERM (`signum`). `step`: the
    last step done by the run that raised it (0: before its first step). Exit status 128 + signum."""

    def __init__(self, signum, step=0):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self):
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

    def __reduce__(self):  # raised in a worker, raised again in the parent
        return Interrupted, (self.signum, self.step)


_stop_signal = 0  # the first SIGINT / SIGTERM received inside stop_on_signals


def stop_requested():
    """The signal (SIGINT or SIGTERM) that asked this process to stop, or 0."""
    return _stop_signal


def check_stop(step=0):
    """Raise Interrupted if a stop was asked for."""
    if _stop_signal:
        raise Interrupted(_stop_signal, step)


@contextlib.contextmanager
def stop_on_signals(main=True):
    """Inside this block SIGINT and SIGTERM ask this process to stop at the end of the step in
    progress. In the main process (`main`) a second one stops it at once, as SIGKILL would (every
    write is atomic); workers and torchrun ranks, which may get a signal twice (from the terminal and
    passed on by their parent), wait for their step to end."""
    global _stop_signal
    _stop_signal = 0

    def handler(signum, frame):
        global _stop_signal
        if _stop_signal and main:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif not _stop_signal:
            _stop_signal = signum
            if main:
                print(f"got {signal.Signals(signum).name}: stopping at the end of the step in progress "
                      f"(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _stop_signal = 0

"""How a training run is stopped from outside: Ctrl-C, ``kill``, a scheduler, a closed terminal or pipe.

Every way a person or a system asks a run to end is treated as Ctrl-C is:

    SIGINT   Ctrl-C                                                   exit status 130
    SIGTERM  ``kill``, ``timeout``, ``docker stop``, a cluster scheduler   143
    SIGHUP   the terminal was closed                                  129
    SIGPIPE  the reader of our output went away (``train.py | head``)    141

During training (``StopRequest``) the first one finishes the current batch (or validation), saves a
checkpoint and exits with the status above (128 + the signal's number, what a shell reports for a
process the signal killed); a second one quits at once, keeping the previous checkpoint. Outside
training (``signals_interrupt``) they stop at once, as Ctrl-C does in any Python program.

A signal that was ignored when the process started (``nohup`` ignores SIGHUP, a shell's ``&``
SIGINT) stays ignored. After SIGHUP or a closed pipe the output has nowhere to go, so it is sent to
/dev/null, and printing cannot fail in the middle of a save.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

from minitensor.distributed import launched_rank

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DESCRIPTIONS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP (terminal closed)",
                signal.SIGPIPE: "closed output pipe"}


class Interrupted(KeyboardInterrupt):
    """Stop now: the exception a stop signal raises outside training (or a second one within)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(DESCRIPTIONS.get(signum, f"signal {signum}"))
        self.signum = signum

    @property
    def exit_status(self):
        return exit_status(self.signum)


def exit_status(signum):
    """A shell's status for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM, ..."""
    return 128 + int(signum)


def _silence_terminal(signum):
    """After SIGHUP the terminal is gone (a write would fail with EIO): send what was going to it
    to /dev/null. After a closed pipe, the same for standard output. Files are left as they are."""
    for stream in (sys.stdout, sys.stderr):
        try:
            descriptor = stream.fileno()
            if signum == signal.SIGPIPE:      # stdout's pipe, and stderr where it is the same one (2>&1)
                silence = stream is sys.stdout or _same_file(descriptor, sys.stdout.fileno())
            else:
                silence = os.isatty(descriptor)
            if silence:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, descriptor)
                os.close(null)
        except (OSError, ValueError, AttributeError):     # no real file behind it (a test's capture)
            continue


def _same_file(first, second):
    a, b = os.fstat(first), os.fstat(second)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _install(handler):
    """Set ``handler`` for every stop signal not ignored at start; returns what to put back."""
    previous = {}
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP raise :class:`Interrupted` at once, as SIGINT raises KeyboardInterrupt."""
    def handle(signum, frame):
        if signum == signal.SIGHUP:
            _silence_terminal(signum)
        raise Interrupted(signum)

    previous = _install(handle)
    try:
        yield
    finally:
        _restore(previous)


class StopRequest:
    """Within training: the first stop signal asks to stop after this batch; a second stops at once.

    ``signum`` is the signal that asked (None while none did); ``exit_status`` the status to end with.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    @requested.setter
    def requested(self, value):     # tests and tools ask for a stop as Ctrl-C does
        self.signum = signal.SIGINT if value else None

    @property
    def exit_status(self):
        return exit_status(self.signum or signal.SIGINT)

    def request(self, signum):
        """Ask to stop because of ``signum`` (also for a closed pipe, which arrives as BrokenPipeError)."""
        if signum in (signal.SIGHUP, signal.SIGPIPE):
            _silence_terminal(signum)
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc):
        _restore(self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.request(signum)
        if launched_rank() != 0:
            return                     # data-parallel: rank 0 says it once for all the ranks
        name = DESCRIPTIONS[signum]
        again = "Ctrl-C" if signum == signal.SIGINT else name.split()[0]
        try:
            print(f"\n{name}: stopping after this batch and saving a checkpoint ({again} again to quit now)",
                  file=sys.stderr, flush=True)
        except OSError:
            pass

"""`preexec_fn` for a CLI subprocess that a test will stop with Ctrl-C (SIGINT).

A terminal delivers Ctrl-C to its foreground job, whose SIGINT is at its default. A shell without
job control starts background jobs (`python -m pytest ... &`, many CI harnesses) with SIGINT and
SIGQUIT ignored, pytest-xdist's workers inherit that, and so would the CLI: it would then, correctly
for a background job, ignore the test's Ctrl-C and never exit. This restores the foreground state
in the child before it executes the CLI.
"""

import signal


def foreground() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

"""The documented process exit codes of every command (BSD sysexits where one fits).

One enum for ``run``, ``serve``, ``lookup``, ``check-config``, ``simulate`` and ``bench``, so the
README's table, the ``--help`` epilogs and the code cannot drift apart. It sits in the bottom
layer: the CLI, the job runner, the daemon and the simulator's command all import it.
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    """A process exit code; an ``int``, so ``sys.exit(code)`` and comparisons just work."""

    #: done, every row ok or not_found
    OK = 0
    #: an unexpected error (a bug): the message names the exception
    INTERNAL = 1
    #: bad command line (argparse's own code), an output path that would clobber an input, or
    #: a job that is a directory or a pipe
    USAGE = 2
    #: done, but some rows failed
    SOME_FAILED = 3
    #: bad input, the input changed since the job started, or the job is locked
    DATA_ERROR = 65
    #: the job file is missing (a missing config file is ``CONFIG``)
    NO_INPUT = 66
    #: the API endpoint stayed unreachable past the outage budget, or the key-state store
    #: could not be opened or stayed unreachable that long
    UNAVAILABLE = 69
    #: cannot write the output, the ledger or the spool; a damaged or read-only key-state
    #: file; ``broker cache`` cannot use the cache
    IO_ERROR = 74
    #: stopped before the end (signal or ``--no-wait``): run the same command again to resume
    RESUMABLE = 75
    #: a key was rejected: no key can serve
    NO_PERMISSION = 77
    #: bad config
    CONFIG = 78
    #: ``broker bench`` stopped by SIGHUP (its terminal closed), with no figures: the shell's
    #: code (128 + 1)
    HANGUP = 129
    #: ``broker bench`` stopped by SIGINT (Ctrl-C), with no figures: the shell's code (128 + 2)
    INTERRUPTED = 130
    #: ``broker bench`` stopped by SIGTERM, with no figures: the shell's code (128 + 15)
    TERMINATED = 143
    #: stdout's reader went away (``| head``): what it did not read is not wanted; the shell's
    #: code for a process ended by SIGPIPE (128 + 13)
    BROKEN_PIPE = 141

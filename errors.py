"""The one base class of every error a user can fix: bad input, a missing file, a damaged store.

Each stage raises its own subclass (``StoreError``, ``ExpertError``, ``TrainError``, ...), whose
message is one line naming the input and the way on. The API lets them propagate; every command
turns them into ``error: <message>`` and exit status 2 through ``n2n.cli.reports_errors`` (one place).
"""


class N2NError(Exception):
    """A problem with what the user gave (arguments, files, stores, runs); the message says how to fix it."""

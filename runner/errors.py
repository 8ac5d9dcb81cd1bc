"""The one exception type for bad user input (exit code 2), and the stop request of a signal."""

import threading

_STOP = threading.Event()


def request_stop() -> None:
    """Record that the user asked the run to stop (SIGINT / SIGTERM)."""
    _STOP.set()


def stop_requested() -> bool:
    """True once a stop was requested: an error raised while a library was interrupted is the
    interrupt, not bad input."""
    return _STOP.is_set()


class UserError(Exception):
    """Bad input from the user: a config, model, data or path problem.

    The message is one line that names what is wrong and where; the CLI prints it and
    exits with code 2. Line breaks inside it (from a path or a value) are escaped, so it
    stays one line whatever the input.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).translate(_ESCAPE_BREAKS))


# Every character str.splitlines() breaks on, as its Python escape.
_ESCAPE_BREAKS = {c: repr(chr(c))[1:-1] for c in (10, 11, 12, 13, 28, 29, 30, 0x85, 0x2028, 0x2029)}

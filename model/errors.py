"""Errors the engine raises. The worker maps them onto the job contract's error codes."""


class KronosError(Exception):
    """Base of every error raised on purpose by `model`."""


class InvalidInputError(KronosError, ValueError):
    """A forecast input the engine cannot run; `field` names it, `series` is its index in a batch call."""

    def __init__(self, field: str, reason: str, series: int | None = None):
        self.field = field
        self.reason = reason
        self.series = series
        where = f"series {series}: " if series is not None else ""
        super().__init__(f"{where}{field}: {reason}")


class ModelLoadError(KronosError):
    """A checkpoint that cannot be found, read or matched to its config; the message says how to fix it.

    `transient` marks failures worth retrying (the Hub timed out or was unreachable) from those that
    will fail the same way again (a missing file, a config that does not match its weights).
    """

    def __init__(self, message: str, transient: bool = False):
        self.transient = transient
        super().__init__(message)

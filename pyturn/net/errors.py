"""Errors of the I/O layer."""


class StartupError(Exception):
    """A socket could not be bound (or a worker could not start); the message names it."""

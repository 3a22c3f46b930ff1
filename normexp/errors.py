"""The one exception type that the command line turns into a one-line message and exit 2."""


class UsageError(Exception):
    """Bad user input (config, data, command line): the message names what to change."""

"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class TinyEngineError(Exception):
    """Bad input from the user: the message names the problem and the fix."""

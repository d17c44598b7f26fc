"""The one exception type the CLI turns into a one-line message and exit code 2.

Anything raised as `UsageError` is the user's input being wrong (a config key, a path, a batch
size); its message names the bad value and what would be valid. Everything else is a bug and keeps
its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""

"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the terminal as a single line on stderr with exit status 2 (see cli.py);
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (a config key, a path, a prompt), with a message that says what to do."""

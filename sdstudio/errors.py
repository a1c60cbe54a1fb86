"""The one error type a user can cause. Its message is one sentence: what is wrong and what to do.

The CLI prints it as one line and exits 2; the UI shows it as a toast. Anything else is a bug and keeps
its traceback (in the log, never on screen).
"""


class UserError(Exception):
    """A mistake the user can fix: a wrong path, a bad setting, a missing file."""

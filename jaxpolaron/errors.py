"""User-facing errors.

`InputError` marks a mistake in what the user gave us (a file, a flag, a value). The CLI prints its
message as one line and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A user mistake: bad file, bad flag or out-of-range value. The message is one complete sentence."""

"""The one base class for mistakes a user can make (bad flag, bad file, bad request).

The CLI prints these as one line and exits 2; the gRPC servicer answers INVALID_ARGUMENT.
Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from a user; the message names the field (or file) and the limit."""

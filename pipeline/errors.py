"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input, path or parameter named by the user (not a bug)."""

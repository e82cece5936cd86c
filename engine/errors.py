"""The one exception type the CLI turns into a one-line message (each subclass says what to do)."""


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a dataset, a checkpoint."""

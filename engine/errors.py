"""The one exception type the CLI turns into a one-line message (each subclass says what to do)."""


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a dataset, a checkpoint."""


class CompiledEvaluationFailed(UserError):
    """torch.compile failed on the evaluation's classifier. What was trained and what was evaluated stays saved; the
    CLI names the rerun without compiling (`arat eval TARGET --compile off`)."""

"""The one exception type the CLI turns into a one-line message (each subclass says what to do), and what those
messages use (a path quoted as one word of a suggested command)."""

import shlex


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a dataset, a checkpoint."""


class CompiledEvaluationFailed(UserError):
    """torch.compile failed on the evaluation's classifier. What was trained and what was evaluated stays saved; the
    CLI names the rerun without compiling (`arat eval TARGET --compile off`)."""


def innermost(error: BaseException) -> BaseException:
    """The error under torch.compile's wrappers (BackendCompilerFailed, ...: `inner_exception` or the cause chain):
    a full disk under Inductor's cache or an out-of-memory while compiling is said as itself."""
    cause, seen = error, {id(error)}
    # a chain may loop (an error re-raised from its own wrapper): each error once
    while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None and id(inner) not in seen:
        cause = inner
        seen.add(id(cause))
    return cause


def shell_word(path) -> str:
    """`path` as one word of a command a message suggests (quoted where it holds a space, a bracket, ...): pasted
    into a shell, `arat train --resume my run (v2)` split or failed."""
    return shlex.quote(str(path))

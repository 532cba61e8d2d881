"""Errors kiln reports to a person: one line, a fix, and an exit code.

The CLI prints `str(error)` and exits with `error.exit_code`; `--debug` adds
the traceback. Anything that is not a KilnError is a bug and shows one.
"""

from __future__ import annotations


class KilnError(Exception):
    exit_code = 1


class UserInputError(KilnError):
    """Bad input (recipe, flags, files): exit 2, nothing written."""

    exit_code = 2


class RecipeErrors(UserInputError):
    """Several problems in recipes, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class VerificationError(KilnError):
    """Bytes that do not match what was recorded: exit 1."""

    exit_code = 1


class GateFailed(KilnError):
    exit_code = 3

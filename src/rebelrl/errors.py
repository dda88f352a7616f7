"""Errors a user can fix, as opposed to bugs.

Every anticipated mistake in what a user hands rebelrl (a config value, a prompt file, a reward, an
environment, a run directory, a training that diverged because of them) raises a subclass of
``UserError``. The CLI catches ``UserError`` once and prints its message on one line with exit code
2; anything else is a bug in rebelrl or in the user's own code and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's inputs; the message alone must say what to fix."""


class NonFiniteError(UserError, FloatingPointError):
    """A loss, gradient norm or reward that is NaN or infinite: training stops before the step."""

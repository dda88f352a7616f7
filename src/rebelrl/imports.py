"""Objects named in configs by import path (``package.module:attr.sub``): rewards, users, envs."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from rebelrl.errors import UserError


class SpecError(UserError, ValueError):
    """An import path in a config that does not name a usable object."""


def import_object(spec: str, what: str) -> Any:
    """The object named by ``"package.module:attr.sub"``; errors name ``what`` and the spec."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        raise SpecError(f"{what} {spec!r}: expected an import path 'package.module:attr'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"{what} {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{what} {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def build_object(obj: Any, spec: str, what: str, kwargs: dict | None = None, **fixed: Any) -> Any:
    """A class, or any callable given ``kwargs``, is called (with ``fixed`` and ``kwargs``) to build
    the object; otherwise ``obj`` is the object itself. A class is always instantiated: using the
    class itself as, say, a reward would silently "score" by constructing one instance per batch."""
    if not (kwargs or inspect.isclass(obj)):
        return obj
    if not callable(obj):
        raise SpecError(f"{what} {spec!r}: got kwargs {sorted(kwargs or {})} but {obj!r} is not callable")
    try:
        return call_user_code(obj, f"{what} {spec!r}", "being built", **fixed, **(kwargs or {}))
    except TypeError as e:
        raise SpecError(f"{what} {spec!r}: building it with kwargs {sorted({**fixed, **(kwargs or {})})} failed: {e}") from e


class UserCodeError(UserError, RuntimeError):
    """A reward, env or user simulator that ended the process (``sys.exit``) instead of returning."""


def call_user_code(fn: Any, who: str, doing: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, where ``fn`` is the user's own code (``who``: "reward 'my_pkg:f'").

    ``sys.exit`` inside it would end the run with that exit code and no message (exit 0 reads as
    success), so a ``SystemExit`` becomes a ``UserCodeError`` naming ``who`` and what it was doing.
    Any other exception is the user's bug and keeps its traceback; ``user_code_context(e)`` then
    says, in one line, whose code raised it and where (the CLI prints that line first).
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as e:
        raise UserCodeError(f"{who} called sys.exit({e.code!r}) while {doing}; it must return (or raise), not exit") from None
    except UserError:
        raise  # already names what to fix
    except Exception as e:
        if user_code_context(e) is None:  # the innermost user code is the one to name
            e._rebelrl_user_code = f"{who} raised {type(e).__name__} while {doing}"
            e.add_note(f"(raised in {who} while {doing})")
        raise


def user_code_context(error: BaseException) -> str | None:
    """The line ``call_user_code`` attached to an exception raised by user code, or None."""
    return getattr(error, "_rebelrl_user_code", None)

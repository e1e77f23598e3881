"""Switches and numbers read from the environment, understood the same way everywhere."""
import os

from .errors import UsageError

_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def env_flag(name: str, default: bool = False) -> bool:
    """``$name`` as a boolean: unset or empty gives ``default``; anything but 1/0,
    true/false, yes/no, on/off is a UsageError naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise UsageError(f"{name}={os.environ[name]!r} is not understood; use 1 or 0")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """``$name`` as a whole number (``_`` separators allowed): unset or empty gives ``default``;
    anything else than a whole number >= ``minimum`` is a UsageError naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        result = int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number") from None
    if result < minimum:
        raise UsageError(f"{name}={value!r} must be at least {minimum}")
    return result

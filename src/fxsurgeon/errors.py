"""The one exception type fxsurgeon raises for its own refusals."""

__all__ = ["SurgeryError"]


class SurgeryError(RuntimeError):
    """fxsurgeon refused or failed to rewrite a model.

    The message says what was found, where (qualified module name, graph node or source line) and what the
    user can do about it. When another library's error caused it, that error is chained as ``__cause__``.
    """

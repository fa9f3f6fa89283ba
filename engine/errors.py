"""The engine's exceptions: every bad model, weight or input raises one of these, never assert."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    def __init__(self, message: str, *, layer: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.layer = layer
        self.field = field

    def to_dict(self) -> dict:
        """Return the error as the JSON body the service sends."""
        out: dict = {"error": self.message, "type": type(self).__name__}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.field is not None:
            out["field"] = self.field
        return out


class ModelError(EngineError, ValueError):
    """The model spec or its weights are invalid."""


class ShapeError(ModelError):
    """A layer's geometry does not fit its input (output size, window, channels)."""


class WeightsError(ModelError):
    """A weights file is unreadable, unsafe, or does not match the spec."""


class InputError(EngineError, ValueError):
    """Images given to a model do not match what it takes (shape, dtype, channels)."""

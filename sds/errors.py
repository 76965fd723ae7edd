"""One family of errors. Every message says what was wrong and what to do about it."""


class SDSError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(SDSError, ValueError):
    """A user-supplied option is malformed or out of range (deterministic: never retried)."""


class DataError(SDSError, ValueError):
    """Calibration or evaluation data is missing, empty or unusable."""


class HubUnreachableError(DataError):
    """The Hugging Face hub (models or datasets) cannot be reached."""


class ModelError(SDSError, ValueError):
    """The model cannot be loaded or its architecture is not supported."""


class NumericalError(SDSError, ArithmeticError):
    """Weights or statistics hold NaN/Inf, or a factorization failed beyond repair."""


class StoreError(SDSError, OSError):
    """The artifact store cannot be reached or fails (transient: may be retried)."""


class StoreFullError(StoreError):
    """The storage has no space left: not retried, since freeing space takes a person."""


class CorruptArtifactError(StoreError):
    """A stored artifact is missing, half-written or fails its hash check: recompute it.
    `damage` says what is wrong with it, without the advice that follows in the message."""

    def __init__(self, message: str, damage: str | None = None):
        super().__init__(message)
        self.damage = damage or message

    def __reduce__(self):  # `damage` too, where Prefect pickles a task's exception
        return type(self), (str(self), self.damage)


class UpstreamLostError(CorruptArtifactError):
    """An artifact a stage reads vanished or was damaged mid-run: a new run recomputes it (a
    retry of the reading stage cannot)."""

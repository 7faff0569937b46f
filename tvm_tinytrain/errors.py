"""The errors a user of tvm-tinytrain can see.

Each one carries a message that names the offending thing and the way out; the
CLI prints it on one line and exits with status 2.
"""


class TinyTrainError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ModelFormatError(TinyTrainError):
    """The file is not a model this project reads (unknown format, truncated, corrupt)."""


class UnsupportedOperatorError(TinyTrainError):
    """The model uses an operator, attribute or structure outside the supported set."""

    def __init__(self, fmt: str, op: str, node: str, supported: list[str], detail: str = ""):
        self.op, self.node = op, node
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"{fmt} op {op} at node {node} is not supported{why}; "
            f"supported: {', '.join(sorted(supported))}"
        )


class ModelStructureError(TinyTrainError):
    """The model's inputs, outputs or shapes cannot be trained (two inputs, dynamic dims...)."""


class InputError(TinyTrainError):
    """A sample or label handed to a trainer does not fit the model."""


class SchemeError(TinyTrainError):
    """A sparse-update scheme, loss or optimizer setting that does not fit the model."""


class OutputError(TinyTrainError):
    """A file or folder cannot be written (missing or read-only folder, full disk), or writing it
    would replace something this project did not make."""


class NonFiniteError(TinyTrainError):
    """A training step produced inf or NaN (a loss, an update or optimizer state); the step was
    not applied: parameters and optimizer state are as they were before it."""

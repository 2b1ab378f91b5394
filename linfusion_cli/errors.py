"""One exception hierarchy for the library; only the CLI turns these into exit codes."""


class LinfusionError(Exception):
    """Base of every error the library raises on purpose (exit code 1: failure at run time)."""

    exit_code = 1


class InputError(LinfusionError):
    """Bad usage or input: a size, a preset, a prompt file, a path (exit code 2)."""

    exit_code = 2


class PlanError(InputError):
    """A generation plan that cannot be run (sizes, strengths, budget)."""


class PresetError(InputError):
    """A preset that is unknown or malformed; the message names the file and key."""


class PromptFileError(InputError):
    """A batch prompt file with a syntax error; the message names the file and line."""


class ModelNotFoundError(InputError):
    """A model, weights file or image that is missing and how to provide it."""


class CheckpointMismatchError(InputError):
    """LinFusion weights that do not fit the UNet they are mounted on."""


class OutputError(InputError):
    """An output path that exists (without overwrite) or cannot be written."""


class ResumeMismatchError(InputError):
    """--resume where this output's stage checkpoints were all made with other settings."""


class OutOfMemoryError(LinfusionError):
    """A stage that ran out of device memory even with the tightest plan tried."""


class WriteError(LinfusionError):
    """A write that failed at run time (disk full, I/O error); nothing partial is left (exit 1)."""


class NonFiniteError(LinfusionError):
    """NaN or inf values out of the UNet or the VAE (fp16 overflow), even after a float32 retry."""

    def __init__(self, part: str, message: str | None = None):
        super().__init__(message or f"the {part} produced NaN/inf values")
        self.part = part

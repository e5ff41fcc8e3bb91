"""Typed errors. Library code raises these; the CLI turns each into one line and an exit code."""


class StvitError(Exception):
    """Base class for every error a user can cause (bad input, missing file, offline download...)."""

    exit_code = 1


class InvalidArgumentError(StvitError, ValueError):
    """An argument has a value the model or command cannot take."""

    exit_code = 2


class CheckpointError(StvitError):
    """A checkpoint is missing, corrupt, or belongs to another architecture."""


class OutputExistsError(StvitError):
    """The output directory exists and overwriting was not asked for."""


class DownloadError(StvitError):
    """Weights or files could not be downloaded (offline, unknown repo, auth)."""


class DataError(StvitError):
    """A dataset is missing, empty or does not match the model."""


class TrainingInterrupted(StvitError):
    """SIGINT/SIGTERM arrived during training; a checkpoint was saved and the run stopped cleanly."""

    exit_code = 130

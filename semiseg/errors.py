"""User-facing errors: the CLI prints them as one line (`semiseg: error: ...`), never a traceback."""


class SemisegError(Exception):
    """An error caused by the user's input (a file, a config, a checkpoint), with a one-line message."""


class DataError(SemisegError):
    """A dataset file is missing, unreadable or inconsistent. The message names the file."""


class ConfigError(SemisegError):
    """A config file or a key=value override is invalid (unknown key, wrong type)."""


class CheckpointError(SemisegError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(SemisegError):
    """Training cannot go on (a non-finite loss, GPU out of memory); the message says what to change."""

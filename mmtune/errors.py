"""User-facing errors.

An `MMTuneError` is a mistake in the user's data, config or checkpoint. The CLI prints its message
without a stack trace: the message alone must say what is wrong and where (file, row, key).
"""


class MMTuneError(Exception):
    """Base class for errors the user can fix."""


class ConfigError(MMTuneError):
    """A config value that cannot work (unknown name, inconsistent options)."""


class DataError(MMTuneError):
    """Bad input data: missing or corrupt file, unknown label, empty split."""


class ModelError(MMTuneError):
    """A model that cannot be built or loaded (unknown name, no weights offline, wrong checkpoint)."""


class TrainingError(MMTuneError):
    """A fit that cannot go on: a non-finite loss or gradient (the message names the step and the samples)."""


class ExportError(MMTuneError):
    """An export that cannot be made or does not hold: a format the model cannot go to, an operator the
    exporter refuses, a missing calibration set, or an exported file that disagrees with the trained model."""

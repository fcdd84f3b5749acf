"""Exception types. Every error a user can meet is a ``MixqError`` with a message that names the problem."""

__all__ = ["MixqError", "ConfigError", "CalibrationFileError", "ModelStructureError", "DataError"]


class MixqError(Exception):
    """Base class of all mixq errors."""


class ConfigError(MixqError, ValueError):
    """An invalid ``config_list`` entry or quantization spec."""


class CalibrationFileError(MixqError, ValueError):
    """A calibration config file or dict that cannot be loaded or does not match the model."""


class ModelStructureError(MixqError, TypeError):
    """A model that mixq cannot quantize as configured (the message names the module)."""


class DataError(MixqError, OSError):
    """A data set file that is missing, corrupted or fails its checksum."""

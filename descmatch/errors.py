"""Error family. The CLI maps each class to an exit code in one place (cli.py)."""

from __future__ import annotations


class DescmatchError(Exception):
    """Base class: a problem the user can fix. Its message is one line naming the culprit."""

    exit_code = 1


class InputError(DescmatchError):
    """A missing, unreadable or malformed input (image, folder, pairs file)."""

    exit_code = 2


class ImageReadError(InputError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""


class OutputError(DescmatchError):
    """An output that cannot be written, or an existing output that does not fit."""

    exit_code = 3


class SchemaError(OutputError):
    """An HDF5 file that is not ours, has another schema version, or other features."""


class WeightsError(DescmatchError):
    """Weights that are missing, do not fit the net, or a net without weights."""

    exit_code = 4


class ConfigError(DescmatchError):
    """An unknown option value or configuration key."""

    exit_code = 2


class TrainingError(DescmatchError):
    """Training went wrong (a non-finite loss)."""


class MissingDependencyError(DescmatchError):
    """An optional dependency that a command needs is not installed (e.g. pycolmap)."""


class ReconstructionError(DescmatchError):
    """Structure from motion registered no model (too few matches, unrelated images)."""

    exit_code = 5

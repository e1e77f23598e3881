"""Exceptions raised by the package; the CLI maps them to exit codes."""


class VehicleNetError(Exception):
    """Base class: the message says what went wrong and what to do."""

    exit_code = 1


class ManifestError(VehicleNetError):
    """assets.json (or VEHICLENET_ASSETS) is malformed or lacks the asset asked for."""

    exit_code = 2


class DownloadError(VehicleNetError):
    """No URL of an asset delivered verified bytes."""


class ChecksumError(VehicleNetError):
    """A file's sha256 is not the one the manifest promises."""


class CheckpointError(VehicleNetError):
    """A checkpoint file cannot be loaded into the network (missing entries, shapes, format)."""


class DataError(VehicleNetError):
    """Input images, folders or feature files are missing or unusable."""


class ImageDecodeError(DataError):
    """An image file cannot be decoded (missing, corrupt, truncated, too large, not an image);
    ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class OfflineError(DownloadError):
    """VEHICLENET_OFFLINE forbids the network and the cache cannot serve the asset."""


class DownloadChecksumError(DownloadError, ChecksumError):
    """Every URL delivered bytes whose sha256 is not the manifest's (nothing was kept)."""


class UsageError(VehicleNetError):
    """A command-line or API argument is unusable (exit code 2)."""

    exit_code = 2


class TrainingError(VehicleNetError):
    """Fine-tuning cannot go on (e.g. the loss became NaN or infinite)."""


class Bf16Unsupported(UsageError):
    """bf16 inference was asked for where it cannot run natively (no bf16 instructions,
    no oneDNN kernels, another device): the message names what is missing."""

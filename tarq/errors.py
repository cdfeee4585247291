"""Errors a user can cause. Each message is one line that names the file, field or value at fault;
the CLI prints it without a traceback and the service maps it to a 4xx."""


class TarqError(Exception):
    """Base of every user-facing error."""


class AudioError(TarqError):
    """Audio that is empty, corrupt, not audio, or outside the limits."""


class ModelError(TarqError):
    """A model id or folder that cannot be loaded safely (missing, not Whisper, pickle-only, remote code)."""


class CalibrationError(TarqError):
    """Calibration data that cannot drive a quantization run (no clips, bad transcripts file)."""


class Cancelled(TarqError):
    """A run stopped because its owner asked it to."""

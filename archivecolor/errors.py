"""The exceptions archivecolor raises. Every message names the file and the fix."""


class ArchivecolorError(Exception):
    """Base class: the CLI prints these as ``Error: ...`` and exits 1."""


class ImageReadError(ArchivecolorError):
    """An input image cannot be decoded."""


class ImageWriteError(ArchivecolorError):
    """An output image cannot be written."""


class ImageTooLarge(ImageReadError):
    """An image exceeds the decompression-bomb pixel limit."""


class ModelNotFound(ArchivecolorError):
    """A model file is missing from the model store."""


class ChecksumMismatch(ArchivecolorError):
    """A file's sha256 differs from the one recorded for it."""


class WeightsUnavailable(ArchivecolorError):
    """No source of backbone weights could be used."""


class ProviderUnavailable(ArchivecolorError):
    """The requested ONNX Runtime execution provider cannot run."""


class CatalogError(ArchivecolorError):
    """The reference catalogue is missing, corrupt or inconsistent."""


class UsageError(ArchivecolorError):
    """Arguments that cannot work together; the CLI exits 2."""


class LedgerError(ArchivecolorError):
    """The run's ledger cannot be read or written: the run stops, since it could not record more work."""


def failure_reason(exc: BaseException, where: str | None = None) -> str:
    """A per-file failure as one line: library errors already name the file and the fix; any other
    exception is prefixed with ``where`` (the file, as printable text) and its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ArchivecolorError):
        return text
    return f"{where + ': ' if where else ''}{type(exc).__name__}: {text}"

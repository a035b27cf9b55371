"""The service's failures: one base class, one class per kind, one mapping to HTTP.

Messages never carry patient data: archive members are referred to by index, never by name.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "https://covidct.example/problems/"


class CovidCTError(Exception):
    """Base: a failure with a stable problem type and an HTTP status."""

    status: ClassVar[int] = 500
    type_: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.type_


class NotAZipError(CovidCTError):
    status, type_, title = 400, "not-a-zip", "Upload is not a zip archive"


class CorruptMemberError(CovidCTError):
    status, type_, title = 400, "corrupt-member", "An archive member could not be read"


class EncryptedMemberError(CovidCTError):
    status, type_, title = 400, "encrypted-member", "Encrypted archive members are not supported"


class UploadTooLargeError(CovidCTError):
    status, type_, title = 413, "too-large", "Upload exceeds a size limit"


class TooManyMembersError(CovidCTError):
    status, type_, title = 413, "too-many-members", "Archive holds too many members"


class TooManySlicesError(CovidCTError):
    status, type_, title = 413, "too-many-slices", "Too many slices"


class ZipBombError(CovidCTError):
    status, type_, title = 413, "zip-bomb", "Archive expands beyond the allowed size or ratio"


class UnsupportedTransferSyntaxError(CovidCTError):
    status, type_, title = 415, "unsupported-transfer-syntax", "DICOM transfer syntax not supported"


class UnsupportedImageError(CovidCTError):
    status, type_, title = 415, "unsupported-image", "Image cannot hold raw CT values"


class NoImageError(CovidCTError):
    status, type_, title = 422, "no-image", "No usable CT slice found"


class MixedSliceSizesError(CovidCTError):
    status, type_, title = 422, "mixed-slice-sizes", "Slices of one series differ in size"


class InvalidRequestError(CovidCTError):
    status, type_, title = 422, "invalid-request", "Request is invalid"


class ExplainUnsupportedError(CovidCTError):
    status, type_, title = 422, "explain-unsupported", "The served model cannot explain"


class UnauthorizedError(CovidCTError):
    status, type_, title = 401, "unauthorized", "Missing or invalid API key"


class QueueFullError(CovidCTError):
    status, type_, title = 503, "queue-full", "Inference queue is full, retry later"

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class NotFoundError(CovidCTError):
    status, type_, title = 404, "not-found", "Not found"


class MalformedRequestError(CovidCTError):
    status, type_, title = 400, "malformed-request", "Request body could not be parsed"


class UnsupportedMediaTypeError(CovidCTError):
    status, type_, title = 415, "unsupported-media-type", "Content type not supported here"


class JobRunningError(CovidCTError):
    status, type_, title = 409, "job-running", "The job is running and cannot be deleted"


class JobNotDoneError(CovidCTError):
    status, type_, title = 409, "job-not-done", "The job has not finished with a diagnosis"


class NoDicomSourceError(CovidCTError):
    status, type_, title = 422, "no-dicom-source", "The job has no DICOM results"


class JobStoreUnavailableError(CovidCTError):
    status, type_, title = 503, "job-store-unavailable", "The job store cannot be reached"


class NotReadyError(CovidCTError):
    status, type_, title = 503, "not-ready", "Model is not loaded yet"


class ShuttingDownError(CovidCTError):
    status, type_, title = 503, "shutting-down", "Service is shutting down, retry elsewhere"


ALL_ERRORS: tuple[type[CovidCTError], ...] = tuple(CovidCTError.__subclasses__())

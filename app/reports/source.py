"""What the DICOM result builders are given: typed, validated, free of pipeline internals.

The source side (`SourceSlice`, `SourceStudy`) is what ingest keeps of the DICOM instances
a result must point at: their four identifiers and one header from which the patient and
study modules are copied. Those values are patient data: they go into the result objects
and nowhere else (no logs, no error messages: errors name the attribute, never its value).

`source_study_from_headers` reads them from pydicom headers (read with
`stop_before_pixels=True`). A result must reference valid DICOM UIDs; a source whose
identifiers are missing or not UIDs (de-identified research data often has UUID strings or
empty SOP Instance UIDs: COVID-CT-MD does) is refused unless the caller asks for stand-ins
with `derive_invalid_uids=True`. Stand-ins are deterministic, recorded in
`SourceStudy.derived_uids`, and the report says so in words, since an archive holding the
original files will not resolve them.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from app.contract import ModelCard
from app.diagnosis import SLICE_COVID_CUTOFF
from app.domain import Verdict

# Namespace of the name-based (version 5) UUIDs behind every UID this package derives.
UID_NAMESPACE = uuid.UUID("5f3c1c9e-6a0e-5d1b-9f0e-2c6f7e0c0d11")
_IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
_LONG_STRING = 64  # LO


class ReportInputError(ValueError):
    """The input cannot make a valid DICOM result. Messages name attributes, never values."""


def uuid_uid(value: uuid.UUID) -> str:
    """The DICOM UID of a UUID (PS3.5 B.2): "2.25." and the UUID as one decimal integer."""
    return f"2.25.{value.int}"


def derived_uid(*parts: str) -> str:
    """A deterministic UID: a name-based UUID of `parts` under this package's namespace."""
    return uuid_uid(uuid.uuid5(UID_NAMESPACE, "\x1f".join(parts)))


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and bool(value) and UID(value).is_valid


def orientation_labels(image_orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the row and column directions from Image
    Orientation (Patient): each direction cosine named by its axes, strongest first
    (PS3.3 C.7.6.1.1.1), e.g. [1, 0, 0, 0, 1, 0] → ("L", "P")."""
    cosines = [float(c) for c in image_orientation]
    if len(cosines) != 6 or not all(math.isfinite(c) for c in cosines):
        raise ReportInputError("ImageOrientationPatient must hold 6 finite numbers")
    return _direction(cosines[:3]), _direction(cosines[3:])


def _direction(cosine: Sequence[float]) -> str:
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive along x, y, z
    order = sorted(range(3), key=lambda axis: -abs(cosine[axis]))
    label = "".join(letters[a][cosine[a] > 0] for a in order if abs(cosine[a]) > 1e-4)
    if not label:
        raise ReportInputError("ImageOrientationPatient holds a zero direction")
    return label


@dataclass(frozen=True)
class SourceSlice:
    """One source instance a result refers to."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    instance_number: int | None = None
    rows: int | None = None  # known rows and columns make the reference an IMAGE one
    columns: int | None = None
    patient_orientation: tuple[str, str] | None = None  # e.g. ("L", "P") for an axial slice

    def __post_init__(self) -> None:
        names = ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid")
        bad = [name for name in names if not is_valid_uid(getattr(self, name))]
        if bad:
            raise ReportInputError(f"not valid DICOM UIDs: {', '.join(bad)}")


@dataclass(frozen=True, eq=False)
class SourceStudy:
    """The source series of a result: its slices (in series order) and one header.

    `header` is a pixel-free dataset of one source instance; the Patient and Study modules
    of the results are copied from it (only those modules, never anything else).
    `derived_uids` names the identifiers that are stand-ins (empty for a clean source).
    """

    header: Dataset
    slices: tuple[SourceSlice, ...]
    derived_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.slices:
            raise ReportInputError("a source study needs at least one slice")
        if len({s.study_instance_uid for s in self.slices}) != 1:
            raise ReportInputError("source slices belong to more than one study")
        if "PixelData" in self.header:
            raise ReportInputError("the source header must not carry pixel data")

    @property
    def study_instance_uid(self) -> str:
        return self.slices[0].study_instance_uid


@dataclass(frozen=True)
class SliceScore:
    """The model's covid probability of one selected slice."""

    source: SourceSlice
    covid_probability: float

    def __post_init__(self) -> None:
        p = float(self.covid_probability)  # numpy scalars welcome; stored as a Python float
        if not 0.0 <= p <= 1.0:
            raise ReportInputError(f"covid_probability must be in [0, 1]. Received: {p!r}")
        object.__setattr__(self, "covid_probability", p)

    @property
    def covid(self) -> bool:
        """The slice counts as COVID: the same cut-off as the diagnosis."""
        return self.covid_probability > SLICE_COVID_CUTOFF


@dataclass(frozen=True)
class ModelIdentity:
    """The algorithm, as IHE AI Results identifies it: name, version, where the weights
    come from, and whether they are untrained (random) weights."""

    name: str
    version: str
    weights_source: str
    untrained: bool
    manufacturer: str = "covidct"

    def __post_init__(self) -> None:
        for name in ("name", "version", "manufacturer"):
            value = getattr(self, name)
            if not value or len(value) > _LONG_STRING or "\\" in value:
                raise ReportInputError(
                    f"{name} must be 1-{_LONG_STRING} characters without a backslash. "
                    f"Received: {value!r}"
                )
        if not self.weights_source:
            raise ReportInputError("weights_source must not be empty")

    @classmethod
    def from_card(cls, card: ModelCard) -> ModelIdentity:
        source = card.weights_source + (f": {card.weights_detail}" if card.weights_detail else "")
        return cls(card.name, card.version, source, untrained=card.untrained)


@dataclass(frozen=True, eq=False)
class Overlay:
    """An RGB rendering (uint8 [rows, cols, 3]) over one source slice, e.g. a heat map."""

    source: SourceSlice
    rgb: np.ndarray

    def __post_init__(self) -> None:
        shape: tuple[int, ...] = tuple(getattr(self.rgb, "shape", ()))
        if getattr(self.rgb, "dtype", None) != np.uint8 or len(shape) != 3 or shape[2] != 3:
            raise ReportInputError(
                f"an overlay must be uint8 [rows, cols, 3]. Received: "
                f"dtype={getattr(self.rgb, 'dtype', None)}, shape={shape}"
            )

    @classmethod
    def from_png(cls, source: SourceSlice, png: bytes) -> Overlay:
        from PIL import Image  # Pillow comes with highdicom

        with Image.open(io.BytesIO(png)) as image:
            return cls(source, np.asarray(image.convert("RGB"), dtype=np.uint8).copy())


@dataclass(frozen=True, eq=False)
class ReportInput:
    """Everything the three result objects are built from.

    `scores` are the selected slices of the deciding series, in series order, with their
    covid probabilities: exactly the verdict's n, of which exactly k above the cut-off.
    """

    study: SourceStudy
    verdict: Verdict
    scores: tuple[SliceScore, ...]
    model: ModelIdentity
    overlays: tuple[Overlay, ...] = field(default=())

    def __post_init__(self) -> None:
        v = self.verdict
        k = sum(score.covid for score in self.scores)
        if len(self.scores) != v.n or k != v.k:
            raise ReportInputError(
                f"scores disagree with the verdict: {len(self.scores)} scores with {k} COVID. "
                f"Received: verdict n={v.n}, k={v.k}"
            )
        known = set(self.study.slices)
        sources = [s.source for s in self.scores] + [o.source for o in self.overlays]
        if any(source not in known for source in sources):
            raise ReportInputError("a score or overlay refers to a slice outside the study")

    @property
    def covid_slices(self) -> tuple[SourceSlice, ...]:
        return tuple(score.source for score in self.scores if score.covid)


def source_study_from_headers(
    headers: Sequence[Dataset], *, derive_invalid_uids: bool = False
) -> SourceStudy:
    """A `SourceStudy` from the pixel-free headers of one series, in series order.

    Identifiers that are missing or not valid UIDs raise `ReportInputError`, unless
    `derive_invalid_uids`: then a UUID-form Study or Series Instance UID becomes its PS3.5
    B.2 UID ("2.25." + the UUID as an integer) and a missing SOP Instance UID a name-based
    UID of the (possibly derived) series UID and the slice's Instance Number, or its
    position when that is absent. The header kept is a copy of the first one, pixels out.
    """
    if not headers:
        raise ReportInputError("no source headers")
    derived: set[str] = set()
    slices = tuple(
        _source_slice(h, i, derive=derive_invalid_uids, derived=derived)
        for i, h in enumerate(headers)
    )
    header = deepcopy(headers[0])
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            delattr(header, keyword)
    ordered = tuple(k for k in _IDENTIFIERS if k in derived)
    return SourceStudy(header=header, slices=slices, derived_uids=ordered)


def _source_slice(
    header: Dataset, position: int, *, derive: bool, derived: set[str]
) -> SourceSlice:
    values = {k: str(header.get(k, "") or "") for k in _IDENTIFIERS}
    invalid = [k for k in _IDENTIFIERS if not is_valid_uid(values[k])]
    if invalid and not derive:
        raise ReportInputError(
            f"source slice {position + 1}: {', '.join(invalid)} missing or not a valid DICOM UID "
            "(derive_invalid_uids=True makes stand-ins)"
        )
    if "SOPClassUID" in invalid:
        raise ReportInputError(f"source slice {position + 1}: SOPClassUID missing or invalid")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in invalid:
            values[keyword] = _from_uuid(values[keyword], keyword, position)
            derived.add(keyword)
    number = _int_or_none(header.get("InstanceNumber"))
    if "SOPInstanceUID" in invalid:
        slot = f"instance {number}" if number is not None else f"position {position}"
        values["SOPInstanceUID"] = derived_uid("sop", values["SeriesInstanceUID"], slot)
        derived.add("SOPInstanceUID")
    return SourceSlice(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        instance_number=number,
        rows=_int_or_none(header.get("Rows")),
        columns=_int_or_none(header.get("Columns")),
        patient_orientation=_orientation_or_none(header.get("ImageOrientationPatient")),
    )


def _orientation_or_none(value: object) -> tuple[str, str] | None:
    """None where the header has no usable orientation (an overlay then cannot be made)."""
    try:
        return orientation_labels(value)  # type: ignore[arg-type]
    except (ReportInputError, TypeError, ValueError):
        return None


def _from_uuid(value: str, keyword: str, position: int) -> str:
    try:
        return uuid_uid(uuid.UUID(value))
    except ValueError:
        raise ReportInputError(
            f"source slice {position + 1}: {keyword} is neither a DICOM UID nor a UUID; "
            "no stand-in can be derived"
        ) from None


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None

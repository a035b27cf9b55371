"""The JSON the service answers with (also the OpenAPI document's schemas)."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field

from app.contract import ModelCard, short_form
from app.domain import Outcome, PatientResult, SeriesResult, Study

PATIENT_RULE = (
    "A slice is COVID when its covid probability > 0.5. A series with n selected slices, "
    "k of them COVID, is COVID when k >= max(1, ceil(t*n)). The patient is COVID when any "
    "series is COVID, normal when at least one series was judged and none is COVID, and "
    "indeterminate when no series has open lung to judge."
)
UNTRAINED_WARNING = (
    "The served model has UNTRAINED (randomly initialised) weights: its probabilities and "
    "this diagnosis are meaningless. Do not use this result for any clinical purpose."
)


def _form_bool(value: object) -> object:
    """A form field's boolean: `true` or `false` (any case), nothing else. pydantic's lax
    mode would also take 0/1/yes/no/on/off, which the OpenAPI document (boolean) does not
    announce: a client sending `explain=1` by mistake learns it, instead of a silent false."""
    if isinstance(value, str):
        if value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ValueError("must be true or false")
    return value


# A boolean form field (multipart): `true` or `false`.
FormBool = Annotated[bool, BeforeValidator(_form_bool)]


class SliceOut(BaseModel):
    index: int = Field(description="0-based position in the series' geometric order")
    source: str = Field(description="archive member the slice came from")
    frame: int | None = Field(None, description="frame/page in a multi-frame file")
    position_mm: float | None = Field(None, description="position along the slice normal")
    instance_number: int | None = None
    dark_pixels: int = Field(description="pixels < 300 (stored value) in the paper's ROI")
    selected: bool = Field(description="kept by the open-lung rule")
    covid_probability: float | None = Field(None, description="null when not selected")
    overlay_png: str | None = Field(
        default=None,
        description="explain=true only, for the slices judged COVID (the highest scores "
        "first, at most COVIDCT_EXPLAIN_MAX_SLICES per request): base64 of a 512 x 512 PNG, "
        "the slice in the lung window with the model's Grad-CAM map of the covid class "
        "laid over it (docs/explain.md); null otherwise",
    )
    heatmap_peak: list[int] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="explain=true only: [row, column] of the map's maximum, in the slice's "
        "pixels as displayed (0-based); null when not explained or the map is zero everywhere",
    )


class ExplanationOut(BaseModel):
    """What explain=true did (app/explain.py)."""

    method: str = Field(description="how the maps were made and drawn")
    covid_slices: int = Field(description="slices judged COVID, over all series")
    explained: int = Field(description="slices that carry an overlay")
    max_slices: int = Field(description="COVIDCT_EXPLAIN_MAX_SLICES: the cap per request")
    empty_maps: int = Field(
        description="explained slices whose map is zero everywhere (no peak, nothing drawn)"
    )


class SelectionOut(BaseModel):
    threshold: float = Field(description="(max - min) / 1.5 of the dark-pixel counts")
    selected: int
    max_dark_pixels: int
    has_lung: bool


class VerdictOut(BaseModel):
    outcome: Outcome
    k: int
    n: int
    required: int
    reason: str


class GeometryOut(BaseModel):
    pixel_spacing_mm: list[float] | None = Field(
        None, description="between rows, between columns, in the standard display, as stored"
    )
    slice_thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = Field(
        None, description="median gap along the slice normal, measured from the positions"
    )
    spacing_uniform: bool | None = None
    gantry_tilt_deg: float | None = None
    normal_angle_deg: float | None = Field(
        None, description="slice normal from the head-feet axis (axial: at most 30)"
    )


class SeriesOut(BaseModel):
    index: int
    kind: str
    key: str
    order: str
    slices_total: int
    resampled_from: list[int] | None
    notes: list[str]
    set_aside: str | None = Field(
        None, description="why the series is not judged (e.g. not axial); null when judged"
    )
    geometry: GeometryOut | None = Field(None, description="DICOM only; null for TIFF")
    selection: SelectionOut
    verdict: VerdictOut
    slices: list[SliceOut]


class SkippedOut(BaseModel):
    member_index: int
    reason: str


class ModelSummary(BaseModel):
    name: str
    version: str
    weights_source: str
    weights_detail: str
    untrained: bool
    created_at: str
    intended_use: str = Field(description="what the model is for (its card has the rest)")
    main_limitation: str = Field(description="the first limit to know before reading a result")


class DiagnosisOut(BaseModel):
    request_id: str
    patient_id: str
    diagnosis: Outcome
    k: int = Field(description="COVID slices of the deciding series")
    n: int = Field(description="selected slices of the deciding series")
    required: int = Field(description="max(1, ceil(t*n)): COVID slices needed")
    threshold: float = Field(description="the threshold fraction t used")
    deciding_series: int | None
    rule: str = PATIENT_RULE
    reason: str
    warnings: list[str]
    model: ModelSummary
    series: list[SeriesOut]
    skipped: list[SkippedOut]
    timings_ms: dict[str, float] = Field(
        description="wall time of each stage of this request, in ms: ingest (unzip and "
        "decode), select, infer, diagnose; explain too with explain=true"
    )
    explanation: ExplanationOut | None = Field(
        default=None, description="explain=true only: what was explained and how; null otherwise"
    )


def model_summary(card: ModelCard) -> ModelSummary:
    """The card's short form: identity, provenance, intended use and main limitation."""
    intended_use, main_limitation = short_form(card)
    return ModelSummary(
        intended_use=intended_use,
        main_limitation=main_limitation,
        name=card.name,
        version=card.version,
        weights_source=card.weights_source,
        weights_detail=card.weights_detail,
        untrained=card.untrained,
        created_at=card.created_at,
    )


def _series_out(r: SeriesResult) -> SeriesOut:
    s, sel = r.series, r.selection
    return SeriesOut(
        index=s.index,
        kind=s.kind,
        key=s.key,
        order=s.order,
        slices_total=len(s.slices),
        resampled_from=list(s.resampled_from) if s.resampled_from else None,
        notes=list(s.notes),
        set_aside=s.set_aside,
        geometry=GeometryOut(**dataclasses.asdict(s.geometry)) if s.geometry else None,
        selection=SelectionOut(
            threshold=sel.threshold,
            selected=sel.n_selected,
            max_dark_pixels=int(sel.counts.max(initial=0)),
            has_lung=sel.has_lung,
        ),
        verdict=VerdictOut(**{f: getattr(r.verdict, f) for f in VerdictOut.model_fields}),
        slices=[
            SliceOut(
                index=i,
                source=info.source,
                frame=info.frame,
                position_mm=info.position_mm,
                instance_number=info.instance_number,
                dark_pixels=int(sel.counts[i]),
                selected=bool(sel.mask[i]),
                covid_probability=None if math.isnan(p) else float(p),
            )
            for i, (info, p) in enumerate(zip(s.slices, r.covid_probability, strict=True))
        ],
    )


def diagnosis_out(
    *, request_id: str, patient_id: str, study: Study, result: PatientResult, card: ModelCard
) -> DiagnosisOut:
    v = result.verdict
    warnings = [UNTRAINED_WARNING] if card.untrained else []
    warnings += [f"series {s.index}: {note}" for s in study.series for note in s.notes]
    warnings += [f"series {s.index} set aside, {s.set_aside}" for s in study.series if s.set_aside]
    trained_on = (card.model_extra or {}).get("training_geometry")  # optional card field
    if isinstance(trained_on, dict):
        warnings += [
            f"series {s.index}: {found}"
            for s in study.series
            if s.geometry is not None and s.set_aside is None
            for found in s.geometry.outside(trained_on, s.resampled_from)
        ]
    return DiagnosisOut(
        request_id=request_id,
        patient_id=patient_id,
        diagnosis=v.outcome,
        k=v.k,
        n=v.n,
        required=v.required,
        threshold=v.threshold,
        deciding_series=result.deciding_series,
        reason=v.reason,
        warnings=warnings,
        model=model_summary(card),
        series=[_series_out(r) for r in result.series],
        skipped=[SkippedOut(member_index=m.index, reason=m.reason) for m in study.skipped],
        timings_ms=result.timings_ms,
    )


# --- asynchronous jobs (POST /jobs, POST /studies; docs/jobs.md) ----------------------------

JobStateName = Literal["queued", "running", "done", "failed"]


class ProblemOut(BaseModel):
    """RFC 9457 problem details of a failed job (the same `type`s as the synchronous route)."""

    type: str
    title: str
    status: int
    detail: str


class DicomPushOut(BaseModel):
    outcome: Literal["stored", "failed", "skipped"] = Field(
        description="skipped: the source had no valid DICOM UIDs (the results refer to "
        "stand-ins, which no PACS study holds)"
    )
    attempts: int
    detail: str = Field("", description="failed: why (status code or error type, no values)")


class DicomResultsOut(BaseModel):
    """What a done job's DICOM results hold (docs/dicom-results.md); no patient data."""

    source: Literal["dicom", "none", "unusable"] = Field(
        description="dicom: made from the DICOM source; none: no DICOM source (TIFF); "
        "unusable: the DICOM source could not make valid results (see problem)"
    )
    objects: int = Field(description="Part 10 objects GET /jobs/{id}/dicom returns")
    structured_report: bool
    key_images: bool = Field(description="false when no slice scored COVID-19")
    overlays: int
    overlays_note: str | None = Field(None, description="why there are no overlays")
    derived_uids: list[str] = Field(
        default_factory=list, description="source identifiers replaced by stand-ins"
    )
    problem: str | None = None
    push: DicomPushOut | None = Field(
        None, description="with COVIDCT_RESULTS_STOW_URL: the STOW-RS push's outcome"
    )


class JobOut(BaseModel):
    id: str = Field(description="192 random bits, URL-safe; the job's URL is /jobs/{id}")
    state: JobStateName
    source: Literal["upload", "stow"] = Field(
        description="upload: POST /jobs; stow: a study received over STOW-RS (POST /studies)"
    )
    receiving: bool = Field(
        False,
        description="stow only: the study is still receiving instances; it is queued once "
        "none has arrived for COVIDCT_STOW_QUIET_S",
    )
    instances: int | None = Field(None, description="stow only: instances received so far")
    created_at: str = Field(description="ISO 8601, UTC")
    updated_at: str = Field(description="ISO 8601, UTC")
    expires_at: str | None = Field(
        None, description="ended jobs: when the job and its result are deleted"
    )
    attempts: int = Field(description="runs started (a run whose worker died is tried twice)")
    diagnosis: DiagnosisOut | None = Field(
        None, description="done: the same document POST /patients/diagnose answers with"
    )
    problem: ProblemOut | None = Field(
        None, description="failed: why, as problem+json (the same types as the sync route)"
    )
    dicom: DicomResultsOut | None = Field(
        None, description="done: its DICOM results (GET /jobs/{id}/dicom), when any were kept"
    )


class JobListOut(BaseModel):
    jobs: list[JobOut] = Field(description="newest first")

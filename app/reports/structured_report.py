"""The Comprehensive 3D SR of a result: a TID 1500 Measurement Report in the source study.

Content tree (see docs/dicom-results.md for the one of P002):

    Imaging Measurement Report (TID 1500)
      language, device observer (the algorithm), procedure reported: CT of chest
      Imaging Measurements
        Measurement Group (TID 1501), patient level: finding COVID-19, algorithm (TID 4019),
          the rule's numbers k, n, required (slices) and t (no units), and the
          qualitative evaluation COVID-19 = Present | Absent | Indeterminate
        Measurement Group per selected slice: finding COVID-19, algorithm, the slice's
          covid probability, and the slice itself as the group's source image
      Qualitative Evaluations: TEXT comments — what the finding rests on, that nobody
        verified it, the untrained-weights warning, stand-in identifiers

VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, CompletionFlag COMPLETE.
"""

from __future__ import annotations

import logging

import highdicom as hd

from app.diagnosis import SLICE_COVID_CUTOFF
from app.reports import coding
from app.reports.provenance import (
    UNTRAINED_LABEL,
    UNVERIFIED_NOTE,
    ResultUids,
    algorithm_equipment,
    algorithm_identification,
    copy_patient_and_study,
    device_observer,
    reference_dataset,
    series_description,
)
from app.reports.source import ReportInput, SliceScore, SourceSlice

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9001
PATIENT_TRACKING_ID = "COVID-19 patient-level finding"
_WHAT = "COVID-19 classification of chest CT slices"


def build_structured_report(
    report: ReportInput,
    *,
    uids: ResultUids | None = None,
    series_number: int = SR_SERIES_NUMBER,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one result, in the source study, as a new series."""
    uids = uids or ResultUids()
    evidence_slices = [s.source for s in report.scores] or list(report.study.slices)
    evidence = [reference_dataset(s, report.study) for s in evidence_slices]
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None, observer_device_context=device_observer(report.model)
        ),
        procedure_reported=coding.CT_OF_CHEST,
        imaging_measurements=[
            _patient_group(report, uids),
            *(_slice_group(report, score, uids) for score in report.scores),
        ],
    )
    content[0].ContentSequence.append(_comments(report))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=uids.uid("sr", "series"),
        series_number=series_number,
        sop_instance_uid=uids.uid("sr", "instance"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description("COVID-19 AI result (SR)", report.model),
        coding_schemes=[coding.local_scheme()],
        contributing_equipment=[algorithm_equipment(report.model, _WHAT)],
        manufacturer=report.model.manufacturer,
        manufacturer_model_name=report.model.name,
        software_versions=report.model.version,
    )
    copy_patient_and_study(sr, report.study)
    logger.info(
        "built the structured report: %d slice groups, outcome %s",
        len(report.scores),
        report.verdict.outcome,
    )
    return sr


def _patient_group(
    report: ReportInput, uids: ResultUids
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    v = report.verdict
    identifier = PATIENT_TRACKING_ID + (f" - {UNTRAINED_LABEL}" if report.model.untrained else "")
    numbers = (
        (coding.COVID_SLICES, v.k, coding.SLICES),
        (coding.SELECTED_SLICES, v.n, coding.SLICES),
        (coding.REQUIRED_SLICES, v.required, coding.SLICES),
        (coding.THRESHOLD_FRACTION, v.threshold, coding.NO_UNITS),
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.uid("tracking", "patient"), identifier=identifier
        ),
        finding_type=coding.COVID_19,
        algorithm_id=algorithm_identification(report.model),
        measurements=[
            hd.sr.Measurement(name=name, value=value, unit=unit) for name, value, unit in numbers
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(coding.COVID_19, coding.PRESENCE[v.outcome])
        ],
    )


def _slice_group(
    report: ReportInput, score: SliceScore, uids: ResultUids
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source = score.source
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.uid("tracking", source.sop_instance_uid),
            identifier=slice_tracking_identifier(source),
        ),
        finding_type=coding.COVID_19,
        algorithm_id=algorithm_identification(report.model),
        measurements=[
            hd.sr.Measurement(
                name=coding.SLICE_COVID_PROBABILITY,
                value=score.covid_probability,
                unit=coding.NO_UNITS,
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
            )
        ],
    )


def slice_tracking_identifier(source: SourceSlice) -> str:
    """A human-readable name for a slice's group: its Instance Number, not patient data."""
    if source.instance_number is not None:
        return f"slice (instance number {source.instance_number})"
    return f"slice {source.sop_instance_uid}"


def _comments(report: ReportInput) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container: free text every SR viewer shows."""
    v = report.verdict
    lines = []
    if report.model.untrained:
        lines.append(
            f"{UNTRAINED_LABEL}: the model's weights are untrained (random); its "
            "probabilities and this finding are meaningless."
        )
    finding = (
        f"COVID-19 {coding.PRESENCE[v.outcome].meaning.lower()}: {v.k} of {v.n} selected "
        f"slices scored COVID-19 (probability > {SLICE_COVID_CUTOFF:g}), {v.required} "
        f"required (threshold {v.threshold:g})"
    )
    reason = f" ({v.reason.rstrip('.')})" if v.outcome == "indeterminate" and v.reason else ""
    lines.append(f"{UNVERIFIED_NOTE} {finding}{reason}.")
    if report.study.derived_uids:
        lines.append(
            "The source lacked valid DICOM identifiers ("
            + ", ".join(report.study.derived_uids)
            + "); this report refers to stand-in UIDs derived from the source's values, "
            "which an archive holding the original files will not resolve."
        )
    container = hd.sr.ContainerContentItem(
        name=coding.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=coding.COMMENT,
                value=line,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in lines
        ]
    )
    return container

"""What every result object carries: where it belongs (the source study, copied patient and
study modules), what made it (the algorithm, per IHE AI Results) and how loudly it warns.

Patient data path: the highdicom constructors are handed reference datasets that hold only
identifiers (their patient attributes empty), so nothing of the patient passes through
highdicom's own checks and log lines; the Patient and Study modules are copied from the
source header afterwards (`copy_patient_and_study`), restricted to the modules of the
result's IOD.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset

from app.reports.coding import DEVICE, PROCESSING_EQUIPMENT
from app.reports.source import ModelIdentity, SourceSlice, SourceStudy, derived_uid

UNTRAINED_SHORT: Final = "UNTRAINED MODEL"
UNTRAINED_LABEL: Final = f"{UNTRAINED_SHORT} - NOT FOR CLINICAL USE"
NOT_DIAGNOSTIC_LABEL: Final = "NOT FOR DIAGNOSTIC USE"
UNVERIFIED_NOTE: Final = "Algorithm result, not verified by a physician."
_LONG_STRING: Final = 64  # LO
_SHORT_TEXT: Final = 1024  # ST
_PATIENT_PLACEHOLDERS: Final = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ResultUids:
    """UIDs of the result objects: random, or derived from `seed` (e.g. the job id) so that
    building a job's results again gives the same UIDs (a repeated store replaces, never
    duplicates)."""

    seed: str | None = None

    def uid(self, *role: str) -> str:
        if self.seed is None:
            return str(hd.UID())
        return derived_uid("result", self.seed, *role)


def series_description(what: str, model: ModelIdentity, *, not_diagnostic: bool = False) -> str:
    """Series Description (LO, 64 characters): the warnings first, so that a narrow column
    still shows them. Next to "NOT FOR DIAGNOSTIC USE" the untrained warning is shortened
    to "UNTRAINED MODEL" (the rest is said already)."""
    parts = [NOT_DIAGNOSTIC_LABEL] if not_diagnostic else []
    if model.untrained:
        parts.append(UNTRAINED_SHORT if not_diagnostic else UNTRAINED_LABEL)
    text = " - ".join([*parts, what])
    if len(text) > _LONG_STRING:
        raise ValueError(f"series description over {_LONG_STRING} characters. Received: {text!r}")
    return text


def reference_dataset(source: SourceSlice, study: SourceStudy) -> Dataset:
    """An identifiers-only stand-in for a source instance, for highdicom's constructors
    (evidence, references): its patient and study attributes are empty on purpose."""
    ds = Dataset()
    ds.SOPClassUID = source.sop_class_uid
    ds.SOPInstanceUID = source.sop_instance_uid
    ds.SeriesInstanceUID = source.series_instance_uid
    ds.StudyInstanceUID = source.study_instance_uid
    if source.rows is not None and source.columns is not None:
        ds.Rows, ds.Columns = source.rows, source.columns
    charset = study.header.get("SpecificCharacterSet")
    if charset:
        ds.SpecificCharacterSet = charset
    for keyword in _PATIENT_PLACEHOLDERS:
        setattr(ds, keyword, None)
    return ds


def copy_patient_and_study(result: hd.SOPClass, study: SourceStudy) -> None:
    """Copy the Patient and Study modules of `result`'s IOD from the source header; the
    Study Instance UID stays the study's (a derived stand-in where the source had none)."""
    probe = deepcopy(study.header)
    probe.SOPClassUID = result.SOPClassUID  # selects the result IOD's modules
    probe.SOPInstanceUID = result.SOPInstanceUID  # the only value highdicom logs here
    probe.StudyInstanceUID = study.study_instance_uid
    result.copy_patient_and_study_information(probe)


def algorithm_equipment(model: ModelIdentity, what: str) -> hd.ContributingEquipment:
    """The Contributing Equipment Sequence item naming the algorithm (IHE AIR)."""
    warning = f"{UNTRAINED_LABEL}. " if model.untrained else ""
    description = f"{warning}{what}; weights: {model.weights_source}"[:_SHORT_TEXT]
    return hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_description=description,
    )


def device_uid(model: ModelIdentity) -> str:
    """One stable Device Observer UID per algorithm identity (name, version, weights)."""
    identity = (model.manufacturer, model.name, model.version, model.weights_source)
    return derived_uid("device", *identity)


def device_observer(model: ModelIdentity) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=model.name,
        ),
    )


def algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version and, as parameters, the weights' source (and the warning)."""
    parameters = [f"weights: {model.weights_source}"]
    if model.untrained:
        parameters.append(UNTRAINED_LABEL)
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=parameters
    )

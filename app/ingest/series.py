"""Frames → series: grouping, per-series limits, order, duplicates, orientation, pixels.

DICOM slices are ordered along the slice normal (head → feet for axial series), else by
InstanceNumber, else by the natural sort of the file name; TIFF pages by file name. A
DICOM series whose slices are not axial is set aside (never judged); an axial one is
brought to the standard display by exact flips and transposes (app/ingest/orientation.py).
Every series leaves as uint16 [N, 512, 512].
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app import errors
from app.domain import Series, SkippedMember, SliceInfo
from app.ingest.dicom import decode_frame, one_frame
from app.ingest.frames import SIZE, Frame, Skipped
from app.ingest.geometry import series_geometry
from app.ingest.limits import IngestLimits
from app.ingest.orientation import AXIAL_LIMIT_DEG, DIRECTIONS, ROTATION_NOTE_DEG
from app.ingest.pool import DecodePool, DecodePoolBroken

logger = logging.getLogger(__name__)

GroupKey = tuple[str, bool, str]  # kind, grouped by folder, SeriesInstanceUID or folder
_STANDARD = "the standard display (rows anterior → posterior, columns patient right → left)"


def natural_key(name: str) -> list[int | str]:
    """Natural sort key: IM00010 after IM00009, IM10 after IM9 (case-insensitive)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def group(frames: list[Frame]) -> list[tuple[GroupKey, list[Frame]]]:
    """DICOM by SeriesInstanceUID, TIFF by folder; deterministic: by kind, then key."""
    groups: dict[GroupKey, list[Frame]] = defaultdict(list)
    for frame in frames:
        groups[(frame.kind, frame.by_folder, frame.key)].append(frame)
    return sorted(groups.items(), key=lambda item: item[0])


def check_groups(groups: list[tuple[GroupKey, list[Frame]]], limits: IngestLimits) -> None:
    """Per-series limits and sizes, before any pixel is decoded."""
    pixels = 0
    for _, frames in groups:
        if len(frames) > limits.max_slices_per_series:
            raise errors.TooManySlicesError(
                f"a series holds {len(frames)} slices; the limit is {limits.max_slices_per_series}"
            )
        shapes = Counter(f.shape for f in frames)
        if len(shapes) > 1:
            sizes = ", ".join(f"{n} × {r}×{c}" for (r, c), n in shapes.most_common())
            raise errors.MixedSliceSizesError(f"slices of one series differ in size: {sizes}")
        pixels += sum(f.shape[0] * f.shape[1] for f in frames)
    if 2 * pixels > limits.max_uncompressed_bytes:
        raise errors.ZipBombError(f"the slices would decode to {2 * pixels} bytes, over the limit")


@dataclass(frozen=True)
class SeriesPlan:
    """A series before its pixels are decoded: its frames in order (duplicates dropped),
    how they were ordered, whether it is set aside, and its slices' shape once displayed."""

    key: GroupKey
    frames: list[Frame]
    order: str
    notes: list[str]
    set_aside: str | None
    to_display: bool  # bring the frames to the standard display (axial DICOM)
    shape: tuple[int, int]


def plan_series(key: GroupKey, frames: list[Frame]) -> SeriesPlan:
    """Order, drop duplicates, judge the orientation; header facts only, nothing decoded.
    Raises MixedSliceSizesError when the slices differ in size once displayed."""
    kind = frames[0].kind
    frames, order, notes = _order_dicom(frames) if kind == "dicom" else _order_tiff(frames)
    set_aside = _not_axial(frames) if kind == "dicom" else None
    to_display = kind == "dicom" and set_aside is None
    if to_display:
        notes += _display_notes(frames)
    shapes = {f.display_shape if to_display else f.shape for f in frames}
    if len(shapes) > 1:  # non-square slices stored in different orientations
        raise errors.MixedSliceSizesError(
            "slices of one series differ in size once in the standard display (non-square "
            "slices stored in different orientations)"
        )
    return SeriesPlan(key, frames, order, notes, set_aside, to_display, shapes.pop())


def decode_series(plan: SeriesPlan, pool: DecodePool | None) -> tuple[Series | None, list[Skipped]]:
    """Decode a planned series into one uint16 stack (in the standard display when axial),
    filled slice by slice in place, and resample it to 512×512 if needed. Returns the series
    (None when no frame decoded) and the members whose pixels could not be decoded.

    Each frame lets go of its compressed pixel data once decoded (the plan's frames are
    replaced by their header facts): a series being decoded holds its compressed data and
    its pixels together only once."""
    frames, kind, to_display = plan.frames, plan.frames[0].kind, plan.to_display
    notes = list(plan.notes)
    stack = np.empty((len(frames), *plan.shape), dtype=np.uint16)
    kept: list[Frame] = []
    skipped: list[Skipped] = []
    for i, values in enumerate(_decoded(frames, pool)):
        frame = frames[i] = _spent(frames[i])
        try:
            if isinstance(values, BaseException):
                raise values
            if values.shape != frame.shape:
                raise ValueError("decoded shape differs from the header")
            if to_display and frame.orientation is not None:
                values = frame.orientation.to_display(values)
            stack[len(kept)] = values
        except Exception as e:  # decoders raise many types on corrupt data: skip the frame
            logger.warning("member %d: pixels not decoded (%s)", frame.member, type(e).__name__)
            reason = "pixel data could not be decoded"
            skipped.append(Skipped("corrupt", SkippedMember(frame.member, reason)))
            continue
        kept.append(frame)
    if not kept:
        return None, skipped
    geometry = None
    if kind == "dicom":
        geometry, geometry_notes = series_geometry(kept, displayed=to_display)
        notes += geometry_notes
    stack, resampled_from = stack[: len(kept)], None
    if stack.shape[1:] != (SIZE, SIZE):
        resampled_from = (int(stack.shape[1]), int(stack.shape[2]))
        stack = _resample(stack)
        notes.append("resampled from {}×{} to 512×512 (bilinear)".format(*resampled_from))
        logger.info("resampled %d slice(s) from %d×%d", len(kept), *resampled_from)
    series = Series(
        index=0,
        kind=kind,
        key=plan.key[2],
        pixels=stack,
        order=plan.order,
        slices=tuple(_slice_info(f) for f in kept),
        resampled_from=resampled_from,
        notes=tuple(notes),
        set_aside=plan.set_aside,
        geometry=geometry,
        source_header=kept[0].header,
    )
    return series, skipped


def _slice_info(frame: Frame) -> SliceInfo:
    """The slice's facts; a DICOM slice's identifiers as stored (None where absent)."""
    ids = [value or None for value in frame.uids] if frame.uids else [None] * 4
    return SliceInfo(
        frame.name,
        frame.frame,
        frame.position,
        frame.instance,
        sop_class_uid=ids[0],
        sop_instance_uid=ids[1],
        series_instance_uid=ids[2],
        study_instance_uid=ids[3],
    )


def _decoded(frames: list[Frame], pool: DecodePool | None) -> Iterator[Any]:
    """Each frame's pixels, or the exception its decoding raised, in order: from the pool's
    workers when there is one (DICOM series), else, or once it broke, in this thread."""
    done = 0
    if pool is not None and all(f.task is not None for f in frames):
        try:
            # taken as submitted, not all at once; each with its own frame's bytes only
            tasks = (one_frame(f.task) for f in frames if f.task)
            for outcome in pool.decode(decode_frame, tasks):
                yield outcome
                done += 1
            return
        except DecodePoolBroken:
            pass  # logged by the pool; the frames not yet decoded are decoded here
    for i in range(done, len(frames)):  # by index: the caller drops each frame's bytes
        try:
            yield frames[i].load()
        except Exception as e:  # decoders raise many types on corrupt data
            yield e


def _spent(frame: Frame) -> Frame:
    """The frame's header facts, without its pixel data (once its pixels are decoded)."""
    return dataclasses.replace(frame, load=_already_decoded, task=None)


def _already_decoded() -> np.ndarray:
    raise RuntimeError("this frame's pixels were decoded already")


# --- order ---------------------------------------------------------------------------


def _by_name(frame: Frame) -> tuple[list[int | str], int]:
    return natural_key(frame.name), frame.frame or 0


def _by_instance(frame: Frame) -> tuple[int, list[int | str], int]:
    return frame.instance or 0, *_by_name(frame)


def _order_tiff(frames: list[Frame]) -> tuple[list[Frame], str, list[str]]:
    return sorted(frames, key=_by_name), "file name, natural sort; pages in file order", []


def _order_dicom(frames: list[Frame]) -> tuple[list[Frame], str, list[str]]:
    """By position along the slice normal (head → feet), else InstanceNumber, else file name."""
    notes = ["SeriesInstanceUID missing: grouped by archive folder"] if frames[0].by_folder else []
    if all(f.position is not None for f in frames):
        frames = sorted(frames, key=lambda f: (-(f.position or 0.0), *_by_instance(f)))
        frames = _drop_duplicates(frames, notes)
        axis = Counter(f.orientation.axis for f in frames if f.orientation).most_common(1)[0][0]
        return frames, f"ImagePositionPatient along the slice normal: {DIRECTIONS[axis]}", notes
    if all(f.instance is not None for f in frames):
        return sorted(frames, key=_by_instance), "InstanceNumber (no ImagePositionPatient)", notes
    return sorted(frames, key=_by_name), "file name, natural sort (no position or instance)", notes


def _drop_duplicates(frames: list[Frame], notes: list[str]) -> list[Frame]:
    """Keep the first slice at each position (to 1 µm): lowest InstanceNumber, then name."""
    kept = frames[:1]
    for frame in frames[1:]:
        if round(frame.position or 0.0, 3) != round(kept[-1].position or 0.0, 3):
            kept.append(frame)
    if dropped := len(frames) - len(kept):
        notes.append(f"{dropped} slice(s) at an already seen position dropped")
        logger.info("duplicate positions: %d slice(s) dropped", dropped)
    return kept


# --- orientation ---------------------------------------------------------------------


def _not_axial(frames: Sequence[Frame]) -> str | None:
    """Why the series is set aside, when any of its slices is not axial; else None."""
    off = [f.orientation for f in frames if f.orientation is not None and not f.orientation.axial]
    if not off:
        return None
    plane = Counter(o.plane for o in off).most_common(1)[0][0]
    angle = max(o.angle_deg for o in off)
    what = plane if len(off) == len(frames) else f"{len(off)} of {len(frames)} slices {plane}"
    logger.info("series set aside: %s slices, normal %.0f° from the head–feet axis", plane, angle)
    return (
        f"not axial: {what} (slice normal {angle:.0f}° from the head–feet axis; only series "
        f"within {AXIAL_LIMIT_DEG:g}° are judged)"
    )


def _display_notes(frames: Sequence[Frame]) -> list[str]:
    """What bringing an axial series to the standard display did, in words."""
    notes = []
    steps = Counter(f.orientation.steps for f in frames if f.orientation is not None)
    for done, n in sorted(steps.items()):
        if done:
            share = "" if n == len(frames) else f" ({n} of {len(frames)} slices)"
            notes.append(f"brought to {_STANDARD}: {', then '.join(done)}{share}")
    if missing := sum(f.orientation is None for f in frames):
        share = "" if missing == len(frames) else f" ({missing} of {len(frames)} slices)"
        notes.append(f"no ImageOrientationPatient: taken as axial, as stored{share}")
    rotation = max((abs(f.orientation.rotation_deg) for f in frames if f.orientation), default=0)
    if rotation > ROTATION_NOTE_DEG:
        notes.append(
            f"in-plane rotation of {rotation:.0f}° from {_STANDARD} left as it is (only exact "
            "flips and transposes are applied)"
        )
    return notes


# --- size ----------------------------------------------------------------------------


def _resample(stack: np.ndarray) -> np.ndarray:
    """Bilinear uint16 [N, H, W] → [N, 512, 512], corners kept (as scipy zoom, order=1)."""
    rows, cols = _interpolation_matrix(stack.shape[1]), _interpolation_matrix(stack.shape[2])
    out = np.empty((len(stack), SIZE, SIZE), dtype=np.uint16)
    for i, image in enumerate(stack):
        out[i] = np.clip(np.rint(rows @ image.astype(np.float32) @ cols.T), 0, 65535)
    return out


def _interpolation_matrix(n: int) -> np.ndarray:
    """[512, n] weights of linear interpolation from n samples onto 512 (ends aligned)."""
    x = np.linspace(0, n - 1, SIZE)
    low = np.minimum(np.floor(x).astype(int), max(n - 2, 0))
    weight = (x - low).astype(np.float32)
    matrix = np.zeros((SIZE, n), dtype=np.float32)
    np.add.at(matrix, (np.arange(SIZE), low), 1 - weight)
    np.add.at(matrix, (np.arange(SIZE), np.minimum(low + 1, n - 1)), weight)
    return matrix

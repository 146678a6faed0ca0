"""What every output says about an image besides its scores: its DICOM identity (so a hospital
can join results back to the PACS) and QA warnings (a CT slice, a lateral view or a knee is
scored as a chest radiograph only with a word about it). Pure: no Ray, no torch.

Only UIDs and acquisition attributes travel; patient names, IDs and birth dates are never read
(`cxrray.dicom.identity` does not touch them), so they cannot reach a Parquet file, a JSON
answer or a log line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cxrray.imaging import DecodedImage, ImageError

# Output field -> DICOM keyword (cxrray.dicom.IDENTITY_KEYWORDS).
IDENTITY_FIELDS: dict[str, str] = {
    "study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID", "sop_uid": "SOPInstanceUID",
    "modality": "Modality", "view_position": "ViewPosition", "body_part": "BodyPartExamined",
    "photometric": "PhotometricInterpretation",
}
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})  # DR is not a DICOM code, but exports use it
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
CHEST_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_LAT"})
MIN_SHORT_SIDE = 256  # below this a PNG/JPEG is a thumbnail, not a film
# Warnings that --strict (scoring) and strict: true (Serve) turn into errors: the image is not
# what the model was trained on. Lateral views and windowing problems stay warnings.
STRICT_WARNINGS: tuple[str, ...] = ("not_radiograph", "not_chest")


class NotAChestRadiograph(ImageError):
    """Strict mode: a DICOM whose modality or body part says it is not a chest radiograph."""

    reason = "not_chest_radiograph"


@dataclass(frozen=True)
class ImageQA:
    identity: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(IDENTITY_FIELDS))
    warnings: list[str] = field(default_factory=list)


def assess(decoded: DecodedImage) -> ImageQA:
    """Identity fields (None where absent or not DICOM) and the QA warnings of one image."""
    identity = {k: (decoded.dicom.get(kw) or None) for k, kw in IDENTITY_FIELDS.items()}
    warnings = list(decoded.warnings)
    if decoded.format == "dicom":
        modality = (identity["modality"] or "").upper()
        if modality and modality not in RADIOGRAPH_MODALITIES:
            warnings.append("not_radiograph")
        if (identity["view_position"] or "").upper() in LATERAL_VIEWS:
            warnings.append("lateral_view")
        body = (identity["body_part"] or "").upper()
        if body and body not in CHEST_PARTS:
            warnings.append("not_chest")
    elif min(decoded.shape[:2]) < MIN_SHORT_SIDE:  # the file's own size, not the decoded (reduced) one
        warnings.append("low_resolution")
    return ImageQA(identity, sorted(set(warnings)))


def enforce(qa: ImageQA, source: str, *, strict: bool) -> None:
    """In strict mode, raise NotAChestRadiograph for the warnings in STRICT_WARNINGS."""
    bad = [w for w in qa.warnings if w in STRICT_WARNINGS]
    if strict and bad:
        what = {"not_radiograph": f"modality {qa.identity['modality']} is not a radiograph (CR/DX)",
                "not_chest": f"body part {qa.identity['body_part']} is not the chest"}
        raise NotAChestRadiograph(source, "; ".join(what[w] for w in bad) + " (strict mode)")

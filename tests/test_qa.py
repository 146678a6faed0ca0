"""DICOM identity and QA warnings in every output, strict mode, and no PHI anywhere: pure
checks on real pydicom test files and generated DX objects, then a scoring run and Serve."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from cxrray.imaging import decode_bytes_info, load_image_info
from cxrray.qa import NotAChestRadiograph, assess, enforce

# The fixture's fake PHI: none of it may appear in a Parquet file, a JSON answer or a log.
PHI = ("SECRET^PATIENTNAME", "PHI-98765", "19700101")


def dx_bytes(*, modality="DX", body_part="CHEST", view="PA", frames=1, size=64, seed=0) -> bytes:
    """A 12-bit DX file with identity, windows and the fixture's fake PHI (builder: test_imaging)."""
    from pydicom.uid import generate_uid

    from tests.test_imaging import make_dicom

    arr = np.random.default_rng(seed).integers(0, 4096, (frames, size, size)).astype(np.uint16)
    attrs = {"BodyPartExamined": body_part} if body_part else {}
    if frames > 1:
        attrs["NumberOfFrames"] = frames
    name, pid, birth = PHI
    return make_dicom(arr, BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096, Modality=modality,
                      ViewPosition=view, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                      PatientName=name, PatientID=pid, PatientBirthDate=birth, **attrs)


def png_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_identity_and_warnings_from_real_and_generated_files() -> None:
    from pydicom.data import get_testdata_file

    ct = assess(load_image_info(get_testdata_file("CT_small.dcm")))
    assert ct.warnings == ["not_radiograph", "window_missing"]  # a CT slice, and it carries no window
    assert ct.identity["modality"] == "CT" and ct.identity["sop_uid"] and ct.identity["study_uid"]
    chest = assess(decode_bytes_info(dx_bytes()))
    assert chest.warnings == [] and chest.identity["modality"] == "DX" and chest.identity["body_part"] == "CHEST"
    assert chest.identity["view_position"] == "PA" and chest.identity["photometric"] == "MONOCHROME2"
    assert assess(decode_bytes_info(dx_bytes(view="LL"))).warnings == ["lateral_view"]
    assert assess(decode_bytes_info(dx_bytes(body_part="KNEE"))).warnings == ["not_chest"]
    assert assess(decode_bytes_info(dx_bytes(body_part=None))).warnings == []  # absent: not a claim
    assert "multi_frame" in assess(decode_bytes_info(dx_bytes(frames=3))).warnings
    assert assess(decode_bytes_info(png_bytes(128))).warnings == ["low_resolution"]
    png = assess(decode_bytes_info(png_bytes(300)))
    assert png.warnings == [] and set(png.identity.values()) == {None}
    # No patient attribute is ever read into the identity.
    assert not set(PHI) & {str(v) for v in chest.identity.values()}


def test_strict_turns_only_not_radiograph_and_not_chest_into_errors() -> None:
    for bad in (dx_bytes(modality="CT"), dx_bytes(body_part="KNEE")):
        qa = assess(decode_bytes_info(bad))
        enforce(qa, "x.dcm", strict=False)  # default: scored and flagged
        with pytest.raises(NotAChestRadiograph, match="strict mode"):
            enforce(qa, "x.dcm", strict=True)
    enforce(assess(decode_bytes_info(dx_bytes(view="LL"))), "x.dcm", strict=True)  # lateral: a warning only


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa_archive")
    (root / "chest.dcm").write_bytes(dx_bytes(seed=1))
    (root / "lateral.dcm").write_bytes(dx_bytes(view="LL", seed=2))
    (root / "knee.dcm").write_bytes(dx_bytes(body_part="KNEE", seed=3))
    (root / "ct.dcm").write_bytes(dx_bytes(modality="CT", seed=4))
    (root / "multi.dcm").write_bytes(dx_bytes(frames=2, seed=5))
    (root / "thumb.png").write_bytes(png_bytes(128))
    (root / "film.png").write_bytes(png_bytes(300))
    return root


@pytest.mark.ray
@pytest.mark.parametrize("strict", [False, True])
def test_scoring_writes_identity_and_warnings_and_never_phi(ray_session, archive, tmp_path, capsys, strict) -> None:
    from cxrray import score
    from tests.test_score import make_artifact

    art = make_artifact(tmp_path / "art")
    out = tmp_path / "out"
    argv = ["--artifact", str(art), "--input", str(archive), "--out", str(out), "--actors", "1", "--json",
            *(["--strict"] if strict else [])]
    assert score.main(argv) == 0
    printed = capsys.readouterr()
    df = score.read_predictions(out).set_index("image_id")
    assert len(df) == 7
    warn = {i: sorted(w) for i, w in df["warnings"].items()}
    assert warn["chest.dcm"] == [] and warn["lateral.dcm"] == ["lateral_view"] and warn["film.png"] == []
    assert warn["knee.dcm"] == ["not_chest"] and warn["ct.dcm"] == ["not_radiograph"]
    assert "multi_frame" in warn["multi.dcm"] and warn["thumb.png"] == ["low_resolution"]
    assert df.loc["chest.dcm", "modality"] == "DX" and df.loc["chest.dcm", "sop_uid"].startswith("1.2.")
    assert pd.isna(df.loc["film.png", "sop_uid"]) and pd.isna(df.loc["film.png", "modality"])
    if strict:
        for i in ("knee.dcm", "ct.dcm"):
            assert df.loc[i, "error"].startswith("not_chest_radiograph:") and pd.isna(df.loc[i, "p_cardiomegaly"])
        assert df.drop(index=["knee.dcm", "ct.dcm"])["error"].isna().all()
    else:
        assert df["error"].isna().all()
    # PHI: not in any byte the job wrote, nor in what it printed or logged.
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for secret in PHI:
        assert secret.encode() not in written and secret not in printed.out + printed.err, secret


@pytest.mark.ray
def test_serve_returns_identity_and_warnings_and_strict_gives_422(ray_session, tmp_path) -> None:
    from ray import serve

    from cxrray.serve import build_app
    from tests.clusters import free_port
    from tests.test_score import make_artifact

    art = make_artifact(tmp_path / "art")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    from cxrray.serve import http_url

    try:
        serve.run(build_app({"artifact": str(art), "deployment": {"num_replicas": 1, "autoscaling_config": None}}),
                  name="qa", route_prefix="/qa")
        serve.run(build_app({"artifact": str(art), "strict": "true",
                             "deployment": {"num_replicas": 1, "autoscaling_config": None}}),
                  name="qa_strict", route_prefix="/qa_strict")
        base = http_url()
        r = requests.post(f"{base}/qa/predict", data=dx_bytes(body_part="KNEE"), timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["warnings"] == ["not_chest"] and body["modality"] == "DX" and body["sop_uid"]
        assert not any(secret in r.text for secret in PHI)
        r = requests.post(f"{base}/qa_strict/predict", data=dx_bytes(body_part="KNEE"), timeout=60)
        assert r.status_code == 422 and r.json()["reason"] == "not_chest_radiograph", r.text
        ok = requests.post(f"{base}/qa_strict/predict", data=dx_bytes(view="LL"), timeout=60)
        assert ok.status_code == 200 and ok.json()["warnings"] == ["lateral_view"]
        ex = requests.post(f"{base}/qa/explain", data=dx_bytes(view="LL"), timeout=60)
        assert ex.status_code == 200 and ex.json()["warnings"] == ["lateral_view"]
        png = requests.post(f"{base}/qa/predict", data=png_bytes(300), timeout=60).json()
        assert png["warnings"] == [] and png["sop_uid"] is None
    finally:
        serve.delete("qa")
        serve.delete("qa_strict")

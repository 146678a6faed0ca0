"""The fast model-input decode (transforms.decode_resized): quality against the previous
full-resolution float path, precision kept for 16-bit and DICOM, JPEG draft really used, one
definition for training, scoring and Serve, and the GPU decoder's CPU fallback."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cxrray.gpu_decode import decode_resized_batch, gpu_decodable, jpeg_frame
from cxrray.imaging import ImageError, decode_bytes, decode_native
from cxrray.transforms import Augment, Preprocess, decode_resized, load_resized, preprocess_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_decode import dicom, jpeg, png, previous  # noqa: E402  (the previous path, kept verbatim)

PRE = Preprocess(size=224, channels=1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def within_bar(ref: np.ndarray, out: np.ndarray) -> bool:
    """The issue's bar: PSNR >= 40 dB or mean absolute error <= 1/255."""
    return psnr(ref, out) >= 40 or np.abs(ref.astype(int) - out).mean() <= 1.0


def xray(size: int, seed: int = 0) -> np.ndarray:
    from cxrray.sources.synthetic import render_study

    return render_study(np.random.default_rng(seed), {}, size)[0]


def test_large_jpeg_decodes_through_dct_draft() -> None:
    data = jpeg(xray(2048))
    im, info = decode_native(data, min_side=2 * 224)
    assert im.size == (512, 512) and im.mode == "L"  # 1/4 scale: the smallest >= 448
    assert info.shape == (2048, 2048) and info.pixels.shape == (2048, 2048) and info.pixels.strides == (0, 0)
    out, _ = decode_resized(data, PRE)
    assert out.shape == (1, 224, 224) and out.dtype == np.uint8
    assert within_bar(previous(data, 224), out[0])


def test_small_jpeg_is_not_reduced_and_rgb_becomes_luma() -> None:
    rgb = np.stack([xray(224)] * 3, axis=-1)
    im, info = decode_native(jpeg(rgb), min_side=448)
    assert im.size == (224, 224) and im.mode == "L" and info.format == "jpeg"


def test_16bit_png_keeps_its_precision() -> None:
    """Values spanning less than two 8-bit steps: an 8-bit-first path would flatten them."""
    ramp = np.tile(np.linspace(30000, 30400, 600), (400, 1)).astype(np.uint16)
    data = png(ramp)
    im, _ = decode_native(data)
    assert im.mode == "F" and np.array_equal(np.asarray(im), decode_bytes(data))
    out = decode_resized(data, PRE)[0][0]
    ref = previous(data, 224)
    assert np.abs(out.astype(int) - ref).max() <= 1 and set(np.unique(out)) == set(np.unique(ref))


def test_dicom_resizes_after_its_luts_at_full_precision() -> None:
    stored = (np.indices((300, 400)).sum(0) * 7 % 4096).astype(np.uint16)
    data = dicom(stored)
    im, info = decode_native(data)
    assert info.format == "dicom" and info.dicom["Modality"] == "DX" and info.shape == (300, 400)
    assert im.mode == "F" and np.array_equal(np.asarray(im), decode_bytes(data))  # windowed, not re-quantised
    assert within_bar(previous(data, 224), decode_resized(data, PRE)[0][0])


@pytest.mark.parametrize("kind", ["png8", "png_rgba", "png16", "dicom", "jpeg_small"])
def test_float_path_gives_the_same_bytes(kind: str) -> None:
    """preprocess_image(decode_bytes(d)) (Serve's /explain, the gallery) == decode_resized(d)
    wherever no JPEG draft applies: the model input depends on the values, not the decoder."""
    img = xray(300, seed=2)
    data = {"png8": lambda: png(img),
            "png_rgba": lambda: png(np.dstack([img, img // 2, img, np.full_like(img, 255)])),
            "png16": lambda: png(img.astype(np.uint16) * 256 + 77),
            "dicom": lambda: dicom(img.astype(np.uint16) * 16 + 3),
            "jpeg_small": lambda: jpeg(xray(160))}[kind]()
    assert np.array_equal(preprocess_image(decode_bytes(data), PRE), decode_resized(data, PRE)[0])


def test_augmented_decode_keeps_size_and_range_and_varies() -> None:
    data = jpeg(xray(1024))
    rng = np.random.default_rng(0)
    a = decode_resized(data, PRE, aug=Augment(), rng=rng)[0]
    b = decode_resized(data, PRE, aug=Augment(), rng=rng)[0]
    assert a.shape == (1, 224, 224) and a.dtype == np.uint8 and not np.array_equal(a, b)
    plain = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0, brightness=0, contrast=0)
    assert within_bar(decode_resized(data, PRE)[0][0], decode_resized(data, PRE, aug=plain, rng=rng)[0][0])


def test_train_score_and_serve_give_identical_bytes(tmp_path: Path) -> None:
    from cxrray.data import decode_files
    from cxrray.predict import Predictor, decode_one

    files = {"big.jpg": jpeg(xray(1500)), "small.png": png(xray(200)),
             "dcm.dcm": dicom(xray(320).astype(np.uint16) * 16)}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    pre = Preprocess(size=96, channels=3)
    train = decode_files({"path": np.array(paths, dtype=object)}, pre=pre, aug=None, label_cols=[])["image"]
    # Serve's prepare_bytes_info needs only the preprocessing and the caps: no model to load.
    serve = object.__new__(Predictor)
    serve.meta, serve.max_pixels, serve.strict, serve.jpeg_device = SimpleNamespace(preprocess=pre), 40_000_000, False, None
    for i, p in enumerate(paths):
        score, err, qa = decode_one(p, pre, max_pixels=40_000_000, max_bytes=1 << 27)
        served, serve_qa = serve.prepare_bytes_info(Path(p).read_bytes(), p)
        assert err is None and np.array_equal(train[i], score) and np.array_equal(score, served)
        assert qa.warnings == serve_qa.warnings
    # QA sees the file's own size: the 200 px PNG is a thumbnail, the 1,500 px JPEG is not.
    assert "low_resolution" in decode_one(paths[1], pre, max_pixels=1 << 30, max_bytes=1 << 27)[2].warnings
    assert "low_resolution" not in decode_one(paths[0], pre, max_pixels=1 << 30, max_bytes=1 << 27)[2].warnings


def test_jpeg_frame_and_gpu_eligibility() -> None:
    img = xray(64)
    base = jpeg(img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", progressive=True)
    assert jpeg_frame(base)[:4] == (0xC0, 8, 64, 64) and gpu_decodable(base)
    assert jpeg_frame(buf.getvalue())[0] == 0xC2 and not gpu_decodable(buf.getvalue())
    assert not gpu_decodable(png(img)) and not gpu_decodable(base, max_pixels=100)


def test_gpu_decoder_falls_back_to_the_cpu_path_exactly() -> None:
    datas = [jpeg(xray(900)), png(xray(300)), b"\xff\xd8\xff\xe0 not a jpeg", dicom(xray(256).astype(np.uint16))]
    out = decode_resized_batch(datas, PRE, device="cpu")
    for d, o in zip(datas[:2] + datas[3:], out[:2] + out[3:]):
        assert np.array_equal(o, decode_resized(d, PRE)[0])
    assert isinstance(out[2], ImageError) and out[2].reason == "truncated"


def test_gpu_arithmetic_on_cpu_is_within_the_bar() -> None:
    """torchvision decode_jpeg + interpolate(antialias) (the nvJPEG path's math) vs the CPU path."""
    datas = [jpeg(xray(2048, seed=s)) for s in range(2)] + [jpeg(xray(224, seed=3))]
    out = decode_resized_batch(datas, PRE, device="cpu", use_torch=True)
    for d, o in zip(datas, out):
        assert o.shape == (1, 224, 224) and within_bar(decode_resized(d, PRE)[0][0], o[0])


def _real_sets(shared: Path) -> dict[str, list[bytes]]:
    nih = sorted((shared / "nih14" / "images").glob("*.png"))
    rgba = [p for p in nih if Image.open(p).mode == "RGBA"][:2]
    nih = rgba + nih[:6]
    kermany = sorted((shared / "kermany" / "chest_xray" / "test").glob("*/*.jpeg"))[::60]
    grey = [np.asarray(Image.open(p).convert("L")) for p in nih[2:5]]
    return {
        "nih_png": [p.read_bytes() for p in nih],
        "kermany_jpeg": [p.read_bytes() for p in kermany],
        "large_jpeg": [jpeg(np.asarray(Image.fromarray(g).resize((2500, 2500), Image.BICUBIC))) for g in grey],
        "dicom": [dicom(g.astype(np.uint16) * 16 + 5) for g in grey],
    }


def test_quality_bar_on_real_images(shared_data: Path) -> None:
    """The issue's bar against the previous path, on real NIH, Kermany and DICOM-wrapped NIH pixels."""
    for name, datas in _real_sets(shared_data).items():
        for d in datas:
            ref, out = previous(d, 224), decode_resized(d, PRE)[0][0]
            assert within_bar(ref, out), (name, psnr(ref, out))


def test_load_resized_names_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(Exception, match="x.png"):
        load_resized(bad, PRE)


def test_predictor_decodes_jpegs_on_the_models_device_and_the_rest_on_the_cpu(tmp_path: Path) -> None:
    """decoder="nvjpeg" is the path a GPU actor or replica takes ("auto" there); on this CPU
    it runs torchvision's decoder with the GPU path's resize. In one batch: the JPEGs go that
    way, within the quality bar and with the same QA; the PNG, the DICOM (its identity kept), a
    progressive JPEG and the broken files take the CPU path, with the same errors as Pillow's."""
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.gpu_decode import jpeg_device_for
    from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.predict import Predictor

    torch.manual_seed(0)
    pre, space = Preprocess(size=64, channels=1), LabelSpace(SYNTHETIC_FINDINGS)
    meta = ModelMeta("small_cnn", space, pre, [0.5] * space.num_classes, gradcam_layer_path("small_cnn"))
    artifact = save_artifact(tmp_path / "artifact", build_model("small_cnn", space.num_outputs, pre), meta)
    buf = io.BytesIO()
    Image.fromarray(xray(300, seed=5)).save(buf, "JPEG", progressive=True)
    files = {"film.jpg": jpeg(xray(1400, seed=1)), "thumb.jpg": jpeg(xray(180, seed=2)),
             "progressive.jpg": buf.getvalue(), "grey.png": png(xray(300, seed=3)),
             "dx.dcm": dicom(xray(320, seed=4).astype(np.uint16) * 16),
             "cut.jpg": jpeg(xray(400, seed=6))[:300], "empty.jpg": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    batch = {"path": np.array([str(tmp_path / n) for n in files], dtype=object)}

    cpu = Predictor(artifact, device="cpu", decoder="pil")
    dev = Predictor(artifact, device="cpu", decoder="nvjpeg")
    assert cpu.jpeg_device is None and dev.jpeg_device == "cpu"
    assert jpeg_device_for("auto", "cpu") is None and jpeg_device_for("auto", "cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="decoder"):
        jpeg_device_for("turbo", "cpu")
    ref, out = cpu(batch), dev(batch)
    assert list(out["error"]) == list(ref["error"])
    assert [e is None for e in out["error"]] == [True, True, True, True, True, False, False]
    assert list(out["sop_uid"]) == list(ref["sop_uid"]) and out["sop_uid"][4] is not None
    assert [list(w) for w in out["warnings"]] == [list(w) for w in ref["warnings"]]
    assert "low_resolution" in out["warnings"][1] and "low_resolution" not in out["warnings"][0]
    cols = [c for c in out if c.startswith("p_")]
    p_ref, p_out = (np.stack([r[c] for c in cols], 1) for r in (ref, out))
    assert np.array_equal(p_ref[2:5], p_out[2:5])  # not JPEG-on-device: the CPU path, bit for bit
    assert np.abs(p_ref[:2] - p_out[:2]).max() < 0.02  # the device path: within its pixel bar
    # Serve's one-upload path takes the same route and gives the same model input.
    img, qa = dev.prepare_bytes_info(files["film.jpg"], "film.jpg")
    cpu_img, _ = cpu.prepare_bytes_info(files["film.jpg"], "film.jpg")
    assert img.shape == (1, 64, 64) and within_bar(cpu_img[0], img[0]) and qa.warnings == []

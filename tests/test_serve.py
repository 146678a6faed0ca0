"""cxrray.serve over real HTTP: the API contract, hostile uploads, batching, and Grad-CAM served
equal to Grad-CAM computed directly. One Serve app for the module on a free loopback port."""
from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from clusters import free_port
from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_UPLOAD = 1 << 20  # small caps keep the oversized-body tests cheap
MAX_PIXELS = 4_000_000
TIMEOUT = 30
IDLE_TIMEOUT = 2.0  # upload_idle_timeout_s: short, so the stalled-upload test is quick


# ------------------------------------------------------------------------------ builders


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def xray_like(seed: int = 0, size: int = 96) -> np.ndarray:
    """A grey chest-ish picture: two dark lungs in a bright body, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.5 * (((x - 0.3) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1)
    img = img - 0.5 * (((x - 0.7) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1)
    img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


def png_bytes(seed: int = 0, size: int = 96) -> bytes:
    return encode(Image.fromarray(xray_like(seed, size)))


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A structurally valid PNG (correct CRCs) whose IHDR declares width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def dicom_bytes(arr: np.ndarray) -> bytes:
    """A 16-bit DX file around `arr` (the DICOM builder lives in test_imaging)."""
    from tests.test_imaging import make_dicom

    return make_dicom(arr.astype(np.uint16))


def make_artifact(out: Path) -> Path:
    """An untrained small_cnn at 64 px over the synthetic findings: enough for the HTTP layer."""
    import torch

    from cxrray.artifact import ModelMeta, save_artifact
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    torch.manual_seed(0)
    space = LabelSpace(SYNTHETIC_FINDINGS)
    pre = Preprocess(size=64, channels=1, mean=(0.5,), std=(0.25,))
    model = build_model("small_cnn", space.num_outputs, pre)
    thresholds = [0.5, 0.45, 0.55, 0.5, 0.4, 0.6]
    meta = ModelMeta("small_cnn", space, pre, thresholds, gradcam_layer_path("small_cnn"),
                     summary={"val_mean_auroc": float("nan"), "history": [{"epoch": 1}], "epochs": 1})
    return save_artifact(out, model, meta)


# ------------------------------------------------------------------------------ config, no Serve


REPO = Path(__file__).resolve().parents[1]


def test_import_is_light() -> None:
    """`serve run`/`serve deploy` import the builder's module in Serve's processes: no torch there."""
    import subprocess
    import sys

    code = "import sys, cxrray.serve; print(sorted(m for m in ('torch', 'captum', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_config_yaml_is_valid_and_builds(artifact) -> None:
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from cxrray.serve import build_app

    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj  # pydantic 2 / 1
    validate(cfg)  # Serve's own schema: what `serve run` and `serve deploy` check
    assert cfg["http_options"]["host"] == "127.0.0.1"
    app = cfg["applications"][0]
    assert app["import_path"] == "cxrray.serve:build_app"
    dep = app["deployments"][0]
    scaling = dep["autoscaling_config"]
    assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] >= 2
    assert scaling["target_ongoing_requests"] < dep["max_ongoing_requests"]
    assert dep["max_ongoing_requests"] > app["args"]["max_batch_size"]  # else a batch can never fill
    assert isinstance(build_app({**app["args"], "artifact": str(artifact)}), serve.Application)


def test_serve_args_validation(artifact, tmp_path, monkeypatch) -> None:
    from cxrray.artifact import ArtifactError
    from cxrray.serve import ServeArgs, build_app

    args = ServeArgs.from_dict({"artifact": str(artifact), "max_batch_size": "8", "batch_wait_timeout_s": "0.02"})
    assert args.max_batch_size == 8 and args.batch_wait_timeout_s == 0.02  # `serve run ... k=v` passes strings
    monkeypatch.chdir(artifact.parent)
    assert ServeArgs.from_dict({"artifact": artifact.name}).artifact == str(artifact)  # relative -> absolute
    with pytest.raises(ValueError, match="serve args: max_batch: unknown key"):
        ServeArgs.from_dict({"artifact": str(artifact), "max_batch": 3})
    monkeypatch.delenv("CXRRAY_ARTIFACT", raising=False)
    with pytest.raises(ValueError, match="artifact="):
        ServeArgs.from_dict({})
    monkeypatch.setenv("CXRRAY_ARTIFACT", str(artifact))
    assert ServeArgs.from_dict({}).artifact == str(artifact)
    with pytest.raises(ArtifactError, match="not a cxrray artifact"):
        build_app({"artifact": str(tmp_path)})
    assert ServeArgs.from_dict({"artifact": str(artifact)}).overlay_max_side == 1024
    assert ServeArgs.from_dict({"artifact": str(artifact), "overlay_max_side": "512"}).overlay_max_side == 512
    with pytest.raises(ValueError, match="overlay_max_side"):
        ServeArgs.from_dict({"artifact": str(artifact), "overlay_max_side": 0})
    with pytest.raises(ValueError, match="strict: 'maybe' is not true or false"):
        ServeArgs.from_dict({"artifact": str(artifact), "strict": "maybe"})
    assert ServeArgs.from_dict({"artifact": str(artifact), "strict": "true"}).strict is True


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("serve") / "artifact")


@pytest.fixture(scope="module")
def url(ray_session, artifact) -> str:
    from cxrray.serve import run_server, shutdown

    base = run_server(str(artifact), port=free_port(), blocking=False, name="test_serve", num_replicas=1,
                      max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_batch_size=8,
                      batch_wait_timeout_s=0.05, num_threads=1, upload_idle_timeout_s=IDLE_TIMEOUT)
    yield base
    shutdown()


@pytest.fixture(scope="module")
def predictor(artifact):
    from cxrray.predict import Predictor

    return Predictor(artifact, device="cpu", num_threads=1)


def post(url: str, path: str, data=None, **kw) -> requests.Response:
    return requests.post(url + path, data=data, timeout=TIMEOUT, **kw)


# ------------------------------------------------------------------------------ the contract


def test_healthz_and_model(url, artifact) -> None:
    from cxrray.artifact import read_meta

    meta = read_meta(artifact)
    r = requests.get(url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model_id": meta.model_id}
    m = requests.get(url + "/model", timeout=TIMEOUT).json()
    assert m["model_id"] == meta.model_id and m["architecture"] == "small_cnn"
    assert m["classes"] == list(SYNTHETIC_FINDINGS)
    assert m["thresholds"] == pytest.approx(dict(zip(SYNTHETIC_FINDINGS, meta.thresholds)))
    shown = post(url, "/predict", png_bytes(1)).json()["classes"]  # the same numbers /predict shows
    assert m["thresholds"] == {name: c["threshold"] for name, c in shown.items()}
    assert m["input"] == {"size": 64, "channels": 1} and m["ensemble"] == {"members": 1, "tta": []}
    assert m["summary"] == {"val_mean_auroc": None, "epochs": 1}  # NaN -> null, history dropped
    assert m["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert {"predict", "explain", "replica"} <= set(m["stats"])
    # the resolved serve config: what was asked, the defaults and the deployment options
    assert m["config"]["artifact"] == str(artifact) and m["config"]["max_upload_bytes"] == MAX_UPLOAD
    assert m["config"]["max_batch_size"] == 8 and m["config"]["overlay_max_side"] == 1024
    assert m["config"]["deployment"]["num_replicas"] == 1


@pytest.mark.parametrize("how", ["raw", "multipart"])
def test_predict_matches_the_predictor(url, predictor, how) -> None:
    data = png_bytes(1)
    r = post(url, "/predict", data) if how == "raw" else post(url, "/predict", files={"file": ("a.png", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predictor.describe(predictor.predict_images(predictor.prepare_bytes(data)[None]))[0]
    assert body["model_id"] == expected["model_id"] and body["positive"] == expected["positive"]
    for name, c in expected["classes"].items():
        got = body["classes"][name]
        assert got["threshold"] == pytest.approx(c["threshold"]) and got["positive"] == c["positive"]
        assert got["probability"] == pytest.approx(c["probability"], abs=1e-5)
    assert body["latency_ms"] > 0


def test_predict_accepts_jpeg_and_dicom(url) -> None:
    img = xray_like(2)
    for data in (encode(Image.fromarray(img), "JPEG", quality=90), dicom_bytes(img.astype(np.uint16) * 16)):
        r = post(url, "/predict", data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert set(r.json()["classes"]) == set(SYNTHETIC_FINDINGS)


def test_explain_served_equals_direct_gradcam(url, predictor) -> None:
    from cxrray.explain import display_image, gradcam, logit_index, overlay_rgb, upsample_map
    from cxrray.imaging import decode_bytes

    data = png_bytes(3)
    r = post(url, "/explain", files={"file": ("a.png", data)}, params={"target": "Cardiomegaly,Pleural Effusion"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["explanations"]) == ["Cardiomegaly", "Pleural Effusion"]
    image = predictor.prepare_bytes(data)
    picture = display_image(decode_bytes(data))  # the upload itself: 96 px, the model sees 64
    space = predictor.label_space
    for name, exp in body["explanations"].items():
        k = space.names.index(name)
        _, low = gradcam(predictor.model, image[None], predictor.meta.gradcam_layer, [logit_index(space, k)])
        assert exp["map_shape"] == list(low[0].shape)
        np.testing.assert_allclose(np.asarray(exp["map"]), low[0], atol=1e-4)
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"]))))
        assert overlay.shape == (96, 96, 3)
        expected = overlay_rgb(picture, upsample_map(low[0], 96, 96))
        assert np.abs(overlay.astype(int) - expected.astype(int)).max() <= 2
    assert body["overlay_size"] == [96, 96]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"]))))
    np.testing.assert_array_equal(shown, picture)
    model_input = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["input_png_base64"]))))
    np.testing.assert_array_equal(model_input, image[0])  # still the model's input, unchanged
    probs = predictor.predict_images(image[None])[0]
    for k, name in enumerate(space.names):
        assert body["classes"][name]["probability"] == pytest.approx(float(probs[k]), abs=1e-5)


def smooth_png(height: int, width: int) -> bytes:
    """A large upload that stays under the test's 1 MiB cap: smooth, so PNG compresses it."""
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    img = 0.8 - 0.5 * ((((x - 0.3) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.5 * ((((x - 0.7) / 0.15) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1) + 0.1 * x
    return encode(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)))


def overlay_of(body: dict) -> Image.Image:
    exp = next(iter(body["explanations"].values()))
    return Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"])))


@pytest.mark.parametrize(("height", "width", "size"), [
    (1024, 1024, (1024, 1024)),  # the bar: a 1024 px PNG gives a 1024 px overlay
    (1500, 2000, (1024, 768)),   # capped at overlay_max_side on the long side, aspect kept
])
def test_explain_overlay_is_at_the_uploads_resolution(url, height, width, size) -> None:
    data = smooth_png(height, width)
    assert len(data) < MAX_UPLOAD
    r = post(url, "/explain", data, params={"target": "Cardiomegaly,Pneumothorax"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlay_size"] == list(size)
    for exp in body["explanations"].values():
        assert Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"]))).size == size
        assert exp["map_shape"] == [len(exp["map"]), len(exp["map"][0])] and exp["map_shape"][0] < 64  # low-res
    assert Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"]))).size == size
    assert Image.open(io.BytesIO(base64.b64decode(body["input_png_base64"]))).size == (64, 64)


def test_explain_on_dicom_draws_on_the_windowed_picture(url) -> None:
    from cxrray.explain import display_image
    from cxrray.imaging import decode_bytes

    data = dicom_bytes(xray_like(11, 120)[:, :100].astype(np.uint16) * 16)  # 100 wide, 120 high
    r = post(url, "/explain", data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlay_size"] == [100, 120] and overlay_of(body).size == (100, 120)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"]))))
    np.testing.assert_array_equal(shown, display_image(decode_bytes(data)))


def test_explain_defaults_to_top_class_and_takes_repeated_targets(url, predictor) -> None:
    data = png_bytes(4)
    probs = predictor.predict_images(predictor.prepare_bytes(data)[None])[0]
    top = SYNTHETIC_FINDINGS[int(np.argmax(probs))]
    assert list(post(url, "/explain", data).json()["explanations"]) == [top]
    r = post(url, "/explain", files={"file": ("a.png", data)},
             data={"target": ["Pneumothorax", "Lung Lesion", "Pneumothorax"]})
    assert list(r.json()["explanations"]) == ["Pneumothorax", "Lung Lesion"]
    bad = post(url, "/explain", data, params={"target": "Broken Heart"})
    assert bad.status_code == 400 and "Cardiomegaly" in bad.json()["error"]


# ------------------------------------------------------------------------------ hostile input


def truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


HOSTILE = {
    "zero_bytes": (lambda: b"", 400),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(4096), 400),
    "truncated_png": (lambda: truncated(png_bytes(5), 0.5), 400),
    "truncated_jpeg": (lambda: truncated(encode(Image.fromarray(xray_like(5)), "JPEG"), 0.5), 400),
    "png_signature_only": (lambda: b"\x89PNG", 400),
    "text": (lambda: b"patient: John Doe\nfindings: none\n", 400),
    "gif": (lambda: encode(Image.fromarray(xray_like(6)), "GIF"), 415),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", 415),
    "huge_declared_png": (lambda: png_declaring(100_000, 100_000), 413),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("path", ["/predict", "/explain"])
def test_hostile_uploads_get_the_right_4xx_fast(url, case, path) -> None:
    make, status = HOSTILE[case]
    t0 = time.perf_counter()
    r = post(url, path, make(), headers={"Content-Type": "image/png"})  # the header is ignored: content decides
    assert r.status_code == status, (case, r.text)
    assert set(r.json()) >= {"error"} and r.json()["error"]
    assert time.perf_counter() - t0 < 10


def test_oversized_bodies_are_413(url) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD + 1)
    r = post(url, "/predict", big)  # Content-Length over the cap: refused before reading
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the received size is what trips the cap
        for _ in range(24):
            yield b"\0" * 65536

    r = post(url, "/predict", chunks())
    assert r.status_code == 413
    r = post(url, "/explain", files={"file": ("big.png", big)})
    assert r.status_code == 413


def test_multipart_without_file_field_and_unknown_routes(url) -> None:
    r = post(url, "/predict", files={"image": ("a.png", png_bytes(7))})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = requests.get(url + "/nope", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(url + "/predict", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()


def test_a_body_whose_last_message_crosses_the_cap_is_413() -> None:
    """The cap tripped on the final ASGI message: the stream was complete, and the drain that
    followed raised "Stream consumed" (a 500) instead of answering 413."""
    import asyncio

    from starlette.requests import Request

    from cxrray.serve_http import UploadError, read_upload

    messages = [{"type": "http.request", "body": b"x" * 60, "more_body": True},
                {"type": "http.request", "body": b"x" * 60, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    with pytest.raises(UploadError) as err:
        asyncio.run(read_upload(Request(scope, receive), cap=100))
    assert err.value.status == 413


def test_a_form_takes_exactly_one_file_part(url) -> None:
    png = png_bytes(7)
    r = post(url, "/predict", files=[("file", ("a.png", png)), ("file", ("b.png", png))])
    assert r.status_code == 400 and "one image per request" in r.json()["error"], r.text
    r = post(url, "/predict", files={"file": (None, png)})  # a part without a filename: a text field
    assert r.status_code == 400 and "is text, not a file" in r.json()["error"], r.text
    assert post(url, "/predict", files={"file": ("a.png", png)}).status_code == 200


def test_an_uploads_file_name_stays_out_of_the_logs(url) -> None:
    """A client's file name can be a patient's name or ID: the server calls every upload
    '<upload>'. A DICOM with an unusable window makes the replica log a warning naming its source."""
    import ray

    from dicom_files import make_dicom

    name = "DOE^JANE_MRN123456.dcm"
    dicom = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), WindowCenter=100, WindowWidth=0)
    r = post(url, "/predict", files={"file": (name, dicom)})
    assert r.status_code == 200 and "window_invalid" in r.json()["warnings"], r.text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline, seen = time.monotonic() + 20, ""
    while time.monotonic() < deadline:  # the replica's log lines reach its files a moment later
        seen = "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()
                         and p.suffix in (".log", ".err", ".out"))
        if "ignoring unusable VOI LUT/window" in seen:
            break
        time.sleep(0.5)
    assert "<upload>: ignoring unusable VOI LUT/window" in seen
    assert "MRN123456" not in seen and "DOE^JANE" not in seen


def test_a_stalled_upload_gets_a_json_408_and_frees_its_slot(url) -> None:
    """Headers and a few bytes, then nothing: a 408 after upload_idle_timeout_s (each stalled
    request holds one of the replica's request slots), in the API's JSON shape."""
    import json
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    t0 = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 5000\r\n\r\n\x89PNG\r\n\x1a\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 2:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    waited = time.perf_counter() - t0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert IDLE_TIMEOUT <= waited < IDLE_TIMEOUT + 10, waited
    assert json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["reason"] == "timeout"
    assert post(url, "/predict", png_bytes(3)).status_code == 200


def test_methods_not_allowed_say_which_are_and_healthz_answers_head(url) -> None:
    r = requests.put(url + "/predict", timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers.get("allow") == "POST" and "error" in r.json()
    r = requests.head(url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200


def test_a_second_server_on_a_port_in_use_is_refused() -> None:
    """Serve's proxy binds with SO_REUSEPORT, so two servers shared a port (and its traffic)."""
    import socket

    from cxrray.serve_run import PortInUse, require_free_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as the proxy's socket
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is in use"):
            require_free_port("127.0.0.1", port)
        with pytest.raises(PortInUse):
            require_free_port("0.0.0.0", port)
    require_free_port("127.0.0.1", free_port())  # a free one passes
    # A server that just stopped leaves its connections in TIME_WAIT: the port is free to serve on.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
        client.close()
    require_free_port("127.0.0.1", port)


def test_server_still_answers_after_hostile_input(url) -> None:
    for make, _ in HOSTILE.values():
        post(url, "/predict", make())
    r = post(url, "/predict", png_bytes(8))
    assert r.status_code == 200 and set(r.json()["classes"]) == set(SYNTHETIC_FINDINGS)
    assert requests.get(url + "/healthz", timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------ batching


def test_concurrent_requests_are_batched(url) -> None:
    before = requests.get(url + "/stats", timeout=TIMEOUT).json()["predict"]
    data = png_bytes(9)
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: post(url, "/predict", data).status_code, range(48)))
    assert codes == [200] * 48
    after = requests.get(url + "/stats", timeout=TIMEOUT).json()["predict"]
    assert after["requests"] - before["requests"] == 48
    assert after["max_batch"] > 1, after
    assert after["batches"] - before["batches"] < 48  # some requests shared a forward pass

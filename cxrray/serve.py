"""Online inference on Ray Serve: one deployment (Predictor + Grad-CAM) behind FastAPI.

Thin glue. Decoding and preprocessing are `Predictor`'s (the same code batch scoring runs),
Grad-CAM and overlays are `cxrray.explain`'s, reading uploads is serve_http's and deploying
serve_run's; this module maps image errors to HTTP status codes, batches forward passes with
`@serve.batch` and serves the web page. Its arguments are `ServeArgs` (job_configs.py).

    serve run serve_config.yaml                          # foreground, Ctrl-C stops it
    ray start --head && serve deploy serve_config.yaml   # onto a running cluster
    serve run cxrray.serve:build_app artifact=/abs/path/to/artifact
    python -c "from cxrray.serve import run_server; run_server('runs/x/artifacts/best')"

Nothing heavy happens at import: torch, the model and the artifact load in the replica.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` class on the
# ingress methods, which Serve rebinds outside this module's globals.
import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrray import storage
from cxrray.job_configs import ServeArgs
from cxrray.serve_http import (STATUS_BY_REASON, SUPPORTED, UPLOAD, BatchStats, UploadError, error, json_safe,
                               parse_targets, read_upload)
from cxrray.serve_run import DEFAULT_AUTOSCALING, http_url, run_server, shutdown

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


api = FastAPI(title="cxrray", description="Chest X-ray classification with Grad-CAM", docs_url="/docs")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # 404/405 etc. in the same {"error": ...} shape as everything else, with their headers (a
    # 405's Allow).
    return error(exc.status_code, str(exc.detail), headers=exc.headers)


@serve.deployment(
    name="CXRServer",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(api)
class CXRServer:
    """One replica: a Predictor, Grad-CAM on its model, two batch queues."""

    def __init__(self, args: dict[str, Any]):
        from cxrray.predict import Predictor  # torch loads here, in the replica

        self.args = ServeArgs.from_dict(args)
        self.predictor = Predictor(
            self.args.artifact,
            device=self.args.device,
            num_threads=self.args.num_threads or None,
            max_pixels=self.args.max_pixels,
            max_bytes=self.args.max_upload_bytes,
            decoder=self.args.decoder,
        )
        self.meta = self.predictor.meta
        # One thread runs every model call: Captum hooks the Grad-CAM layer during an
        # explanation, and a concurrent forward pass on the same module would feed it.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="cxrray-model")
        self._decode_threads = ThreadPoolExecutor(2, thread_name_prefix="cxrray-decode")
        self.stats = BatchStats()
        self._predict_batch.set_max_batch_size(self.args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._explain_batch.set_max_batch_size(self.args.explain_max_batch_size)
        self._explain_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._page = (STATIC / "index.html").read_text(encoding="utf-8")
        self._warm_up()
        log.info("CXRServer ready: model %s, batch %d / explain %d", self.meta.model_id,
                 self.args.max_batch_size, self.args.explain_max_batch_size)

    def _warm_up(self) -> None:
        """One forward pass, one Grad-CAM and one overlay before the first request, so lazy
        imports (captum, matplotlib) and allocator warm-up do not land on a user's latency."""
        import numpy as np

        if self.predictor.label_space.num_classes == 0:
            return
        blank = np.zeros((1, self.meta.preprocess.size, self.meta.preprocess.size), np.uint8)
        _, _, _, low = self._explain_sync([(blank, [0])])[0]
        self._overlays(blank[0], low)

    # ---- model work (batched) ---------------------------------------------------------------

    async def _on_model_thread(self, fn, *a):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *a)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, images: list) -> list:
        import numpy as np

        self.stats.record("predict", len(images))
        probs = await self._on_model_thread(self.predictor.predict_images, np.stack(images))
        return list(probs)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _explain_batch(self, items: list) -> list:
        self.stats.record("explain", len(items))
        return await self._on_model_thread(self._explain_sync, items)

    def _explain_sync(self, items: list[tuple[Any, list[int] | None]]) -> list[tuple[Any, list, Any, Any]]:
        """[(image [1,S,S], class indices or None for the top class)] -> per item
        (probabilities [K], class indices, maps [T,S,S], low-res maps [T,h,w])."""
        import numpy as np

        from cxrray.explain import gradcam, logit_index

        images = np.stack([im for im, _ in items])
        probs = self.predictor.predict_images(images)
        chosen = [ks if ks else [int(np.argmax(p))] for (_, ks), p in zip(items, probs)]
        rows = [i for i, ks in enumerate(chosen) for _ in ks]
        logits = [logit_index(self.predictor.label_space, k) for ks in chosen for k in ks]
        maps, low = gradcam(self.predictor.model, images[rows], self.meta.gradcam_layer, logits)
        out, start = [], 0
        for p, ks in zip(probs, chosen):
            out.append((p, ks, maps[start : start + len(ks)], low[start : start + len(ks)]))
            start += len(ks)
        return out

    # ---- request plumbing ---------------------------------------------------------------

    def _decode_for_explain(self, data: bytes, source: str) -> tuple[Any, Any]:
        """Image bytes -> (model input uint8 [1,S,S], the picture uint8 (h, w) for overlays).

        The model input is built by `Predictor.prepare_bytes_info`, as for /predict; the picture
        is the decoded (and, for DICOM, windowed) image at its own resolution, its long side
        capped at overlay_max_side."""
        from cxrray.explain import display_image
        from cxrray.imaging import decode_bytes_info

        # The model input exactly as /predict builds it (transforms.decode_resized: JPEG DCT-domain
        # reduction etc.), so Grad-CAM explains the scores /predict returns; the picture is the full
        # decode, for the overlay at the upload's own resolution.
        image, qa = self.predictor.prepare_bytes_info(data, source, strict=self.args.strict)
        pixels = decode_bytes_info(data, source=source, max_pixels=self.predictor.max_pixels).pixels
        return (image, display_image(pixels, self.args.overlay_max_side)), qa

    def _decode_for_predict(self, data: bytes, source: str):
        return self.predictor.prepare_bytes_info(data, source, strict=self.args.strict)

    async def _image(self, request: Request, *, picture: bool = False) -> tuple[Any, list[str], Any]:
        """Upload -> (uint8 [1,S,S], targets from the form); with picture=True the first item
        is (model input, picture) instead (`_decode_for_explain`). Raises UploadError (a 4xx)."""
        from cxrray.imaging import ImageError, sniff_format

        data, targets = await read_upload(request, self.args.max_upload_bytes, self.args.upload_idle_timeout_s)
        source = UPLOAD
        decode = self._decode_for_explain if picture else self._decode_for_predict
        try:
            loop = asyncio.get_running_loop()
            image, qa = await loop.run_in_executor(self._decode_threads, decode, data, source)
        except ImageError as e:
            fmt = sniff_format(data)
            if fmt is not None and fmt not in SUPPORTED:  # a known format we do not read
                raise UploadError(415, f"{e.detail}; send PNG, JPEG or DICOM", "unsupported") from None
            raise UploadError(STATUS_BY_REASON.get(e.reason, 400), e.detail, e.reason) from None
        except Exception as e:  # noqa: BLE001 - a decoder bug on a user's file is still a 400
            log.warning("decode failed on %s: %s: %s", source, type(e).__name__, e)
            raise UploadError(400, f"could not decode the image ({type(e).__name__})", "corrupt") from None
        return image, targets, qa

    def _result(self, probs, started: float, qa) -> dict[str, Any]:
        import numpy as np

        res = self.predictor.describe(np.asarray(probs)[None])[0]
        res.update(qa.identity)  # DICOM UIDs etc. (null for PNG/JPEG); never patient data
        res["warnings"] = qa.warnings
        res["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
        return res

    # ---- routes -------------------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            image, _, qa = await self._image(request)
        except UploadError as e:
            return error(e.status, str(e), e.reason)
        probs = await self._predict_batch(image)
        return JSONResponse(self._result(probs, started, qa))

    @api.post("/explain")
    async def explain(self, request: Request) -> Response:
        from cxrray.explain import resolve_targets

        started = time.perf_counter()
        try:
            (image, picture), form_targets, qa = await self._image(request, picture=True)
            names = parse_targets(request.query_params.getlist("target") + form_targets)
            if len(names) > self.args.max_targets:
                raise UploadError(400, f"at most {self.args.max_targets} targets per request", "bad_request")
            try:
                indices = resolve_targets(self.predictor.label_space, names) if names else None
            except KeyError as e:
                raise UploadError(400, str(e.args[0]), "unknown_class") from None
        except UploadError as e:
            return error(e.status, str(e), e.reason)
        probs, chosen, _, low = await self._explain_batch((image, indices))
        loop = asyncio.get_running_loop()
        pngs, picture_png = await loop.run_in_executor(self._decode_threads, self._overlays, picture, low)
        res = self._result(probs, started, qa)
        names = self.predictor.label_space.names
        res["explanations"] = {
            names[k]: {
                "overlay_png_base64": png,  # on the picture, overlay_size
                "map": low[i].tolist(),  # the layer's own low-resolution map, for programs
                "map_shape": list(low[i].shape),
            }
            for i, (k, png) in enumerate(zip(chosen, pngs))
        }
        res["overlay_size"] = [int(picture.shape[1]), int(picture.shape[0])]  # [width, height]
        res["input_png_base64"] = self._input_png(image)
        res["image_png_base64"] = picture_png
        res["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
        return JSONResponse(res)

    def _overlays(self, picture, low) -> tuple[list[str], str]:
        """(one overlay PNG per low-resolution map, drawn on `picture` (uint8 (h, w)) with the
        map upsampled onto it; the picture itself as PNG), base64."""
        from cxrray.explain import encode_png, render_overlay

        def b64(png: bytes) -> str:
            return base64.b64encode(png).decode("ascii")

        overlays = [b64(render_overlay(picture, m, max_side=self.args.overlay_max_side)) for m in low]
        return overlays, b64(encode_png(picture))

    def _input_png(self, image) -> str:
        """The model's input image (what Grad-CAM explains, S x S); `image_png_base64` is the
        upload itself at overlay_size, for pages that cannot show DICOM."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image[0]).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @api.get("/model")
    async def model(self) -> Response:
        meta = self.meta
        summary = {k: v for k, v in (meta.summary or {}).items() if k != "history"}
        space = meta.label_space
        return JSONResponse(json_safe({
            "model_id": meta.model_id,
            "architecture": meta.architecture,
            "task": space.task,
            "uncertain_classes": space.uncertain_classes,
            "classes": list(space.names),
            # As /predict shows and decides them: float32, the dtype the probabilities are compared in.
            "thresholds": dict(zip(space.names, (float(t) for t in self.predictor.thresholds))),
            "input": {"size": meta.preprocess.size, "channels": meta.preprocess.channels},
            "gradcam_layer": meta.gradcam_layer,
            "ensemble": {"members": meta.members, "tta": list(meta.tta)},  # 1 member, no views: one plain model
            "created": meta.created,
            "code_version": meta.code_version,
            "summary": summary,
            "limits": {"max_upload_bytes": self.args.max_upload_bytes, "max_pixels": self.args.max_pixels,
                       "max_targets": self.args.max_targets, "formats": list(SUPPORTED)},
            "batching": {"max_batch_size": self.args.max_batch_size,
                         "explain_max_batch_size": self.args.explain_max_batch_size,
                         "batch_wait_timeout_s": self.args.batch_wait_timeout_s},
            "stats": self._stats(),
            "config": asdict(self.args),  # the resolved serve config (serve_config.yaml args + defaults)
        }))

    def _stats(self) -> dict[str, Any]:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (unit use)
            replica = None
        return {"replica": replica, **self.stats.snapshot()}

    @api.get("/stats")
    async def stats_route(self) -> Response:
        return JSONResponse(self._stats())

    @api.api_route("/healthz", methods=["GET", "HEAD"])  # load balancers probe with either
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok", "model_id": self.meta.model_id})

    @api.get("/", response_class=HTMLResponse)
    async def index(self) -> Response:
        return HTMLResponse(self._page, headers={"Cache-Control": "no-cache"})

    @api.get("/favicon.ico")
    async def favicon(self) -> Response:
        return Response(status_code=204)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named in serve_config.yaml (`import_path: cxrray.serve:build_app`).

    Validates the arguments and that the artifact is readable before any replica starts, so a
    wrong path fails the deploy with a clear message instead of a replica crash loop.
    """
    from cxrray.artifact import read_meta

    parsed = ServeArgs.from_dict(args)
    storage.check_store(parsed.artifact, what="artifact")
    read_meta(parsed.artifact)  # local or URI: a wrong path fails here, not in every replica
    # serve.batch caps a batch at max_ongoing_requests: keep room for a full batch of each kind.
    options = {"max_ongoing_requests": max(32, 2 * parsed.max_batch_size)}
    options.update(parsed.deployment)
    # The replica gets the resolved args, deployment options included: /model reports them.
    return CXRServer.options(**options).bind({**asdict(parsed), "deployment": options})


__all__ = ["DEFAULT_AUTOSCALING", "CXRServer", "ServeArgs", "build_app", "http_url", "json_safe", "run_server", "shutdown"]

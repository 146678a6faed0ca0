"""`cxrray demo`: the whole story on one local Ray cluster.

generate data -> manifest + patient split (leakage check) -> TorchTrainer (2 workers) ->
evaluate: the test split is bulk-scored once, by the scoring pipeline (Ray Data actor pool),
into <out>/predictions, then ROC curves, report and Grad-CAM gallery -> the bulk-scoring
figures are that evaluation's scoring run; on synthetic data the test split is also written
as DICOM, scored into <out>/predictions_dicom and compared with the JPEG scores -> Serve
/predict and /explain over HTTP (overlay PNG saved) -> shut down. Each stage is the same code
the individual subcommands run; this module only chains them and keeps the receipts.
"""
from __future__ import annotations

import base64
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxrray import console, storage
from cxrray.job_configs import DemoConfig  # noqa: F401 - the demo's schema, validated at the CLI

log = logging.getLogger(__name__)

LABEL_TRUTHS = {"certain": "on certain labels", "train": "under the training policy's labels",
                "truth": "against what was drawn"}
# The training policy of sources whose labels hold uncertain cells: U-Ones, the CheXpert paper's
# choice for most observations; the evaluation then shows what it costs to score against it.
DEMO_UNCERTAINTY = "U-Ones"


@dataclass
class DemoSummary:
    out: str
    outputs: dict[str, str] = field(default_factory=dict)
    mean_auroc: float | None = None  # test split, certain labels (uncertain and blank masked)
    val_mean_auroc: float | None = None
    # The same test scores against other truths: the training policy's labels and, on
    # synthetic data, what the generator drew (truth.csv; faint counts as present).
    auroc_by_labels: dict[str, float | None] = field(default_factory=dict)
    images_scored: int = 0
    score_errors: int = 0
    score_images_per_s: float = 0.0
    predict_latency_ms_p50: float | None = None
    explain_latency_ms: float | None = None
    url: str | None = None  # only while Serve is kept running (--serve)
    dicom_copy: dict = field(default_factory=dict)  # the test split as DICOM, scored and compared
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def human(self) -> str:
        def f(v, fmt="{:.4f}"):
            return "n/a" if v is None else fmt.format(v)

        lines = [f"demo finished in {self.seconds:.0f}s  (stages: "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in self.stages.items()) + ")",
                 f"  test mean AUROC      {f(self.mean_auroc)} on certain labels   (validation "
                 f"{f(self.val_mean_auroc)})" + "".join(
                     f";  {f(v)} {LABEL_TRUTHS[k]}" for k, v in self.auroc_by_labels.items() if k != "certain"),
                 f"  bulk scoring         {self.images_scored} images, {self.score_errors} errors, "
                 f"{self.score_images_per_s:.1f} images/s",
                 f"  Serve /predict p50   {f(self.predict_latency_ms_p50, '{:.0f} ms')};  /explain "
                 f"{f(self.explain_latency_ms, '{:.0f} ms')}"]
        if self.dicom_copy:
            d = self.dicom_copy
            lines.append(f"  DICOM copy           {d['images']} images in {len(d['syntaxes'])} transfer syntaxes, "
                         f"{d['joined']} joined back by SOP Instance UID, {d['errors']} errors; "
                         f"|p(DICOM) - p(JPEG)| mean {d['mean_abs_diff']:.4f}, max {d['max_abs_diff']:.4f}; "
                         f"same decision {d['decision_agreement']:.1%}, rank correlation >= {d['min_rank_corr']:.3f}")
        lines += [f"  {k:20s} {v}" for k, v in self.outputs.items()]
        if self.url:
            lines.append(f"  web page             {self.url}  (Ctrl-C to stop)")
        return "\n".join(lines)


class Stage:
    """Logs '[k/7] what' and records how long it took."""

    def __init__(self, summary: DemoSummary, k: int, title: str):
        self.summary, self.k, self.title = summary, k, title

    def __enter__(self):
        log.info("[%d/7] %s ...", self.k, self.title)
        self.t = time.time()
        return self

    def __exit__(self, *exc):
        dt = time.time() - self.t
        self.summary.stages[self.title.split()[0].rstrip(",:")] = dt
        if exc[0] is None:
            log.info("[%d/7] %s done in %.1fs", self.k, self.title, dt)


def _dataset(cfg: DemoConfig, out: str, s: DemoSummary):
    """Returns (manifest path, loss, whether its labels hold uncertain cells) for the chosen source."""
    from cxrray.config import ManifestConfig
    from cxrray.manifest_build import build_manifest

    if cfg.source == "synthetic":
        from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

        root = storage.join(out, "synthetic")
        with Stage(s, 1, "generate synthetic chest X-rays"), tempfile.TemporaryDirectory(prefix="cxrray-syn-") as tmp:
            # Rendered on local disk, then published: --out may be a bucket prefix.
            local = Path(root) if not storage.is_uri(root) else Path(tmp)
            syn = write_synthetic_chexpert(local, SynthConfig(n_patients=cfg.n_patients, size=cfg.size,
                                                              seed=cfg.seed), progress=sys.stderr.isatty())
            if storage.is_uri(root):
                storage.upload_dir(local, root)
            s.outputs["synthetic data"] = storage.join(root, Path(syn.root).name)
        options = {"views": ["frontal"], "official_split": False}
    else:
        with Stage(s, 1, f"read {cfg.source}"):
            pass
        root, options = cfg.root, ({"classes": 2} if cfg.source == "kermany" else {})
    with Stage(s, 2, "manifest, patient split and leakage check"):
        built = build_manifest(ManifestConfig(source=cfg.source, root=str(root), out=storage.join(out, "manifest.parquet"),
                                              split=(0.7, 0.15, 0.15), seed=cfg.seed, **options))
        s.outputs["manifest"] = built.path
    # small_cnn from scratch learns the synthetic findings fastest with plain BCE at 1e-3
    # (jobs/configs/synthetic_demo.yaml says the same); multi-class sources need CE.
    loss = "ce" if built.label_space.task == "multiclass" else "bce"
    return built.path, loss, built.label_space.raw_uncertain


def _auroc_by_labels(certain: float | None, artifact: str, manifest: str, predictions: str,
                     synthetic_root: str | None) -> dict[str, float | None]:
    """The test split's mean AUROC on certain labels (the evaluation's), under the training
    policy's labels, and on synthetic data against truth.csv (drawn = present or faint)."""
    import numpy as np

    from cxrray.artifact import read_meta
    from cxrray.evaluate import join_predictions, label_targets, split_rows
    from cxrray.metrics import compute_metrics
    from cxrray.score.store import read_predictions

    meta = read_meta(artifact)
    space = meta.label_space
    rows, data_space = split_rows(manifest, "test", meta)
    preds = read_predictions(predictions, columns=["image_id", *space.prob_columns, "model_id", "error"])
    probs, ok = join_predictions(rows, preds, space.prob_columns)
    rows, probs = rows[ok].reset_index(drop=True), probs[ok]
    out = {"certain": certain}
    trained, _ = label_targets(rows[list(space.names)].to_numpy(np.float32), data_space, meta, "train")
    out["train"] = compute_metrics(space, trained, probs).mean_auroc
    if synthetic_root:
        from cxrray.sources.synthetic import read_truth

        truth = read_truth(storage.join(synthetic_root, "truth.csv")).reindex(rows["image_id"])
        drawn = np.stack([(truth[n] != "absent").to_numpy(np.float32) for n in space.names], axis=1)
        out["truth"] = compute_metrics(space, drawn, probs).mean_auroc
    return out


def _decision_agreement(a, b, n_classes: int) -> float:
    """The share of (image, class) pairs on which two scorings make the same call, at the
    artifact's thresholds (the `positive` lists)."""
    if not len(a):
        return 1.0
    differ = sum(len(set(x) ^ set(y)) for x, y in zip(a, b))
    return 1.0 - differ / (len(a) * n_classes)


def _score_dicom_copy(cfg: DemoConfig, out: str, test, artifact: str, jpeg_predictions: str,
                      s: DemoSummary) -> None:
    """Write the test split again as CR/DX DICOM (every transfer syntax this install can write),
    bulk-score it, join the rows back to the JPEG twins by SOP Instance UID and compare."""
    import io

    import numpy as np
    import pandas as pd

    from cxrray.score import ScoreConfig, read_predictions, score
    from cxrray.sources.synthetic import SynthConfig
    from cxrray.sources.synthetic_dicom import write_synthetic_dicom

    dest = storage.join(out, "dicom_copy")
    with tempfile.TemporaryDirectory(prefix="cxrray-dcm-") as tmp:
        written = write_synthetic_dicom(tmp, SynthConfig(n_patients=cfg.n_patients, size=cfg.size, seed=cfg.seed),
                                        image_ids=test["image_id"])
        storage.upload_dir(tmp, dest)
    summ = score(ScoreConfig(artifact=artifact, input=storage.join(dest, "dicom"),
                             out=storage.join(out, "predictions_dicom"), actors=cfg.score_actors))
    dcm = read_predictions(storage.join(out, "predictions_dicom"))
    labels = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(dest, "dicom_labels.csv"))), dtype=str)
    joined = dcm.merge(labels[["SOPInstanceUID", "chexpert_path"]], left_on="sop_uid", right_on="SOPInstanceUID")
    jpeg = read_predictions(jpeg_predictions).set_index("image_id")
    cols = [c for c in dcm.columns if c.startswith("p_")]
    # The JPEG twin is the lossy one (8 bits, quality 90): uncompressed DICOM and JPEG 2000 differ
    # from it by the same ~0.01, and a sharper model widens |dp|. What a decode bug breaks
    # (an inverted MONOCHROME1, a wrong rescale or bit shift) is the ranking and the decisions, so
    # those are reported too: they do not move with the model's confidence.
    dcm_p, jpeg_p = joined[cols].to_numpy(np.float64), jpeg.loc[joined["chexpert_path"], cols].to_numpy(np.float64)
    diff = np.abs(dcm_p - jpeg_p)
    rank_corr = [pd.Series(dcm_p[:, k]).corr(pd.Series(jpeg_p[:, k]), method="spearman") for k in range(len(cols))]
    s.dicom_copy = {"images": len(dcm), "joined": int(len(joined)), "errors": summ["errors"],
                    "syntaxes": written.syntaxes, "mean_abs_diff": float(np.nanmean(diff)) if diff.size else 0.0,
                    "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
                    "decision_agreement": _decision_agreement(joined["positive"], jpeg.loc[joined["chexpert_path"], "positive"],
                                                              len(cols)),
                    "min_rank_corr": float(np.nanmin(rank_corr)) if diff.size else 1.0}
    s.outputs["DICOM predictions"] = storage.join(out, "predictions_dicom")


def _serve_round_trip(artifact: str, image_path: str, out: str, s: DemoSummary, port: int) -> str:
    import requests

    from cxrray import serve

    url = serve.run_server(str(artifact), port=port, blocking=False)
    data = storage.read_bytes(image_path)
    latencies = []
    for _ in range(10):
        t = time.perf_counter()
        r = requests.post(f"{url}/predict", data=data, timeout=60)
        r.raise_for_status()
        latencies.append((time.perf_counter() - t) * 1000)
    storage.write_json(storage.join(out, "predict.json"), r.json())
    t = time.perf_counter()
    r = requests.post(f"{url}/explain", data=data, timeout=120)
    r.raise_for_status()
    s.explain_latency_ms = (time.perf_counter() - t) * 1000
    explained = r.json()
    target, first = next(iter(explained["explanations"].items()))
    overlay = storage.write_bytes(storage.join(out, "gradcam_overlay.png"), base64.b64decode(first["overlay_png_base64"]))
    s.predict_latency_ms_p50 = statistics.median(latencies)
    s.outputs["predict response"] = storage.join(out, "predict.json")
    s.outputs["Grad-CAM overlay"] = f"{overlay} ({target})"
    return url


def run_demo(cfg: DemoConfig) -> DemoSummary:
    import ray

    from cxrray.config import TrainConfig, build
    from cxrray.evaluate import evaluate
    from cxrray.train import init_ray, train

    start = time.time()
    out = storage.normalize(cfg.out)  # a local folder or a bucket prefix (s3://...)
    storage.check_store(out, what="--out")
    storage.makedirs(out)
    s = DemoSummary(out)
    from cxrray.schema import save_config

    # The demo's own resolved config beside its outputs, as every job saves one (the training
    # run keeps its TrainConfig, the scoring output its ScoreConfig in _manifest.json).
    s.outputs["config"] = save_config(cfg, storage.join(out, "config.yaml"))
    started_ray = init_ray(None, cfg.num_workers + 2)
    try:
        manifest, loss, uncertain = _dataset(cfg, out, s)
        with Stage(s, 3, f"train {cfg.model} with TorchTrainer ({cfg.num_workers} workers)"):
            tcfg = build(TrainConfig, {
                "manifest": str(manifest), "model": cfg.model, "image_size": cfg.size, "channels": 1,
                "epochs": cfg.epochs, "batch_size": 16, "lr": 1e-3, "loss": loss, "run_name": "demo",
                "storage_path": storage.join(out, "runs"), "num_workers": cfg.num_workers, "seed": cfg.seed,
                "labels": None, "max_failures": 1, "uncertainty": DEMO_UNCERTAINTY if uncertain else None})
            res = train(tcfg)
            s.val_mean_auroc = res.best_val_mean_auroc
            s.outputs["artifact"] = str(res.best_artifact)
        with Stage(s, 4, "evaluate on the test split (bulk-scored once, into predictions/)"):
            # Scored through the bulk-scoring pipeline straight into <out>/predictions, which
            # stage 5 reports: the test split is scored once.
            ev = evaluate(res.best_artifact, manifest, storage.join(out, "evaluation"), split="test", bootstrap=500,
                          predictions=storage.join(out, "predictions"), actors=cfg.score_actors)
            s.mean_auroc = ev.metrics.mean_auroc
            s.auroc_by_labels = _auroc_by_labels(ev.metrics.mean_auroc, res.best_artifact, manifest,
                                                 storage.join(out, "predictions"),
                                                 s.outputs.get("synthetic data"))
            s.outputs["ROC curves"] = ev.outputs["roc_curves"]
            s.outputs["report"] = ev.outputs["markdown"]
            gallery = [v for k, v in ev.outputs.items() if k.startswith("gradcam_gallery_")]
            if gallery:
                s.outputs["Grad-CAM gallery"] = f"{len(gallery)} PNGs, e.g. {gallery[0]}"
        with Stage(s, 5, "bulk-score: the test split's rows from the evaluation"
                   + (", then its DICOM copy" if cfg.source == "synthetic" else "")):
            from cxrray.manifest import read_manifest

            df, _ = read_manifest(manifest)
            test = df[df["split"] == "test"][["image_id", "path"]]
            summ = ev.scoring  # evaluate's scoring job: one committed row per test image in <out>/predictions
            s.images_scored, s.score_errors = summ["rows"], summ["errors"]
            s.score_images_per_s = summ["images_per_s"]
            s.outputs["predictions"] = summ["output"]
            if cfg.source == "synthetic":
                _score_dicom_copy(cfg, out, test, str(res.best_artifact), summ["output"], s)
        with Stage(s, 6, "Serve: /predict and /explain over HTTP"):
            url = _serve_round_trip(res.best_artifact, test["path"].iloc[0], out, s, cfg.port)
            if cfg.keep_serving:
                s.url = url
        if console.ray_log_dir():
            s.outputs["Ray logs"] = console.ray_log_dir() + ("" if console.verbose() else "  (-v prints them here)")
        s.seconds = time.time() - start
        storage.write_json(storage.join(out, "summary.json"), s.to_dict())
        if cfg.keep_serving:
            log.info("Serve keeps running at %s (web page); Ctrl-C to stop", s.url)
            print(s.human(), flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return s
    finally:
        with Stage(s, 7, "shut down Serve and Ray"):
            try:
                from cxrray import serve

                serve.shutdown()
            except Exception as e:  # noqa: BLE001 - shutting down; report, don't mask the real error
                log.warning("serve shutdown: %s", e)
            if started_ray and ray.is_initialized():
                ray.shutdown()

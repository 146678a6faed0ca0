"""Training: the engine learns without Ray; Ray Train learns the synthetic findings, keeps its
DDP replicas identical and resumes a re-run; evaluating the saved artifact reproduces the
training-time numbers; `cxrray evaluate` writes a sound report.

Multi-node placement, worker loss and `ray job submit` need clusters of their own: they are in
test_train_cluster.py.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrray.cli import main
from cxrray.config import TrainConfig, load_config
from cxrray.manifest import read_manifest, write_manifest
from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "synthetic_demo.yaml"

# The bar for a short CPU training on the synthetic set (small_cnn, 48 px, 8 epochs), on
# validation's certain labels (uncertain and blank masked). Measured 0.985 (2026-12-01, seeded
# data and training); under the U-Ones labels it used to be scored on, the same setting gave
# 0.892-0.937, which is why the old bar was 0.90. A trivial model scores 0.5.
QUALITY_BAR = 0.95


def demo_config(tmp: Path, *overrides: str) -> TrainConfig:
    """The shipped demo config pointed at a temp dir; `overrides` as on the command line."""
    return load_config(TrainConfig, DEMO_CONFIG, [f"root={tmp / 'syn'}", f"manifest={tmp / 'manifest.parquet'}",
                                                  f"storage_path={tmp / 'runs'}", *overrides])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """500 synthetic patients at 64 px (~750 frontal images) and their manifest, built the way
    `cxrray train` builds it from the demo config's source/root (`ensure_manifest`). A large
    validation split keeps the AUROC bar from being decided by a handful of positives."""
    from cxrray.train import ensure_manifest

    tmp = tmp_path_factory.mktemp("train")
    write_synthetic_chexpert(tmp / "syn", SynthConfig(n_patients=500, size=64, seed=1), progress=False)
    ensure_manifest(demo_config(tmp, "split=[0.6,0.4,0.0]"))
    return tmp


# --------------------------------------------------------------------------- the engine, no Ray


@pytest.fixture(scope="module")
def quick_artifact(synthetic) -> tuple[Path, Path]:
    """`quick_train` (tests/quick_train.py, no Ray) on the synthetic set at 48 px: (artifact, manifest)."""
    from quick_train import quick_train

    manifest = synthetic / "manifest.parquet"
    df, space = read_manifest(manifest)
    artifact = quick_train(df, space, synthetic / "quick_artifact", model="small_cnn", size=48, epochs=4,
                           batch_size=16)
    return artifact, manifest


@pytest.mark.slow
def test_quick_train_learns_the_synthetic_findings(quick_artifact):
    artifact, _ = quick_artifact
    summary = json.loads((artifact / "model.json").read_text())["summary"]
    losses = [r["train_loss"] for r in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["val_mean_auroc"] > 0.85, summary["history"]


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_cli_writes_plots_json_and_markdown(quick_artifact, tmp_path, capsys):
    artifact, manifest = quick_artifact
    df, space = read_manifest(manifest)
    # One class with a single label value in the evaluated split: reported, never a NaN crash.
    flat = space.names[0]
    df.loc[df["split"] == "valid", space.columns[0]] = 0.0
    one_valued = write_manifest(df, space, tmp_path / "one_valued.parquet")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--artifact", str(artifact), "--manifest", str(one_valued), "--split", "valid",
               "--out", str(out), "--bootstrap", "50", "--json"])
    assert rc == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    for name in ("roc_curves.png", "training_curves.png"):
        img = Image.open(out / name)
        img.load()
        assert img.size[0] > 300 and np.asarray(img.convert("L")).std() > 5, name  # a drawn plot, not blank
    # Strict JSON: a NaN anywhere would make this raise.
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert metrics == json.loads(json.dumps(summary))
    per = metrics["per_class"]
    assert per[flat]["auroc"] is None and "only one label value" in per[flat]["note"]
    others = [per[n]["auroc"] for n in space.names[1:]]
    assert all(a is not None and 0 <= a <= 1 for a in others)
    assert metrics["mean_auroc"] == pytest.approx(np.mean(others))
    assert metrics["n_images"] == int((df["split"] == "valid").sum()) and metrics["n_errors"] == 0
    report = (out / "report.md").read_text()
    assert "n/a (only one label value" in report and "![ROC curves](roc_curves.png)" in report
    assert f"{flat:28s} only one label value" in stdout


# --------------------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def quality_run(ray_session, synthetic):
    """The demo config as shipped (loss, lr, schedule, augmentation, epochs, 2 workers), at 48 px
    to fit CI: on the synthetic findings 48 px learns as well as 64 px in half the time."""
    from cxrray.train import train

    cfg = demo_config(synthetic, "image_size=48", "split=[0.6,0.4,0.0]", "run_name=quality")
    return cfg, train(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_training_reaches_the_quality_bar(quality_run):
    cfg, res = quality_run
    assert [r["epoch"] for r in res.history] == list(range(1, cfg.epochs + 1))
    aurocs = [r["val_mean_auroc"] for r in res.history]
    assert res.best_val_mean_auroc == max(aurocs)
    assert res.best_val_mean_auroc >= QUALITY_BAR, [round(a, 4) for a in aurocs]
    n_valid = int((read_manifest(cfg.manifest)[0]["split"] == "valid").sum())
    assert all(r["val_images"] == n_valid and r["train_images"] > 0 for r in res.history)
    assert load_config(TrainConfig, Path(cfg.run_dir) / "config.yaml") == cfg  # the resolved config beside the run


@pytest.mark.ray
@pytest.mark.slow
def test_evaluating_the_artifact_reproduces_the_training_time_auroc(quality_run, tmp_path):
    """The Predictor (files -> artifact preprocessing -> model) sees the same pixels as the
    training-time validation pass, so the numbers agree to rounding."""
    from cxrray.evaluate import evaluate

    cfg, res = quality_run
    meta = json.loads((Path(res.best_artifact) / "model.json").read_text())
    best_row = next(r for r in res.history if r["epoch"] == meta["summary"]["best_epoch"])
    ev = evaluate(res.best_artifact, cfg.manifest, tmp_path / "eval", split="valid", bootstrap=0)
    assert ev.n_images == meta["summary"]["n_valid"] and ev.n_errors == 0
    assert ev.metrics.mean_auroc == pytest.approx(best_row["val_mean_auroc"], abs=1e-3)
    for name, auroc in ev.metrics.auroc_by_class().items():
        assert auroc == pytest.approx(best_row["val_auroc"][name], abs=1e-3), name


@pytest.mark.ray
def test_ddp_replicas_hold_identical_parameters_after_a_step(ray_session, tmp_path):
    """Two workers start from different random weights and see different batches; after
    `prepare_model` and one `engine.train_one_epoch` step their parameters are bit-identical."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:  # nested: Ray pickles it by value (the test module is not importable)
        import hashlib

        import ray.train
        import ray.train.torch
        import torch

        from cxrray.engine import train_one_epoch
        from cxrray.losses import masked_bce
        from cxrray.models import build_model
        from cxrray.transforms import Preprocess

        rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(100 + rank)  # different init: prepare_model must broadcast rank 0's weights
        model = build_model("small_cnn", 3, Preprocess(size=32, channels=1, mean=(0.5,), std=(0.25,)))
        local_init = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        model = ray.train.torch.prepare_model(model)

        def digest() -> str:
            return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()

        start = digest()
        rng = np.random.default_rng(rank)  # each rank its own data: gradients differ until all-reduced
        images = rng.integers(0, 256, (8, 1, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 2, (8, 3)).astype(np.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = [{"image": torch.from_numpy(images), "labels": torch.from_numpy(labels)}]  # one step of all 8
        stats = train_one_epoch(model, batches, optimizer, masked_bce,
                                device=ray.train.torch.get_device(), max_steps=1)
        mine = {"rank": rank, "local_init": local_init, "start": start, "after": digest(), "loss": stats["loss"]}
        everyone = [None] * ray.train.get_context().get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        if rank == 0:  # Train V2 keeps metrics only with checkpoints: hand the answer back in a file
            Path(config["out"]).write_text(json.dumps(everyone))
        ray.train.report({})

    out = tmp_path / "ranks.json"
    TorchTrainer(loop, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path))).fit()
    r0, r1 = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert r0["local_init"] != r1["local_init"]  # the replicas really started apart
    assert r0["loss"] != r1["loss"]  # and saw different data
    assert r0["start"] == r1["start"] == r0["local_init"]  # prepare_model synced rank 0's weights
    assert r0["after"] == r1["after"] != r0["start"]  # one all-reduced step: still identical, and moved


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_instead_of_starting_over(quality_run, tmp_path):
    """Re-running a finished run under its name with one more epoch trains that epoch only. On a
    copy of the quality run (same name, new storage path) so the other tests' artifacts stay put."""
    from cxrray.train import train

    cfg, first = quality_run
    shutil.copytree(first.run_dir, tmp_path / cfg.run_name)
    second = train(replace(cfg, storage_path=str(tmp_path), epochs=cfg.epochs + 1))
    assert [r["epoch"] for r in second.history] == list(range(1, cfg.epochs + 2))
    # The first epochs come from the checkpoint, not a retraining: their rows are unchanged
    # (augmentation is unseeded, so a second pass would give other losses).
    assert second.history[:-1] == first.history
    assert second.epochs_done == cfg.epochs + 1 and math.isfinite(second.history[-1]["train_loss"])
    assert len([d for d in Path(second.run_dir).glob("checkpoint_*") if d.is_dir()]) == 2  # num_to_keep=2


def _lockstep_rank(rank: int, port: int, passes: list[list[int]], out: str) -> None:
    """One DDP rank (gloo) taking 3 epochs of its share of a stream through `_in_lockstep`; its
    share is `passes[rank]`: the pass tag of each of its batches."""
    import torch

    from cxrray.data import PASS, PassStream
    from cxrray.train import _in_lockstep

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batches = [{"image": torch.tensor([10 * rank + i]), "labels": torch.zeros(1, 1), PASS: torch.tensor([k])}
                   for i, k in enumerate(passes[rank])]
        stream = PassStream(iter(batches))
        epochs = [[int(b["image"][0]) for b in _in_lockstep(stream.epoch(k), stream, 2, torch.device("cpu"))]
                  for k in range(3)]
        Path(out, f"{rank}.json").write_text(json.dumps(epochs))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_takes_the_same_steps_an_epoch_though_their_shares_of_a_pass_differ(tmp_path):
    """Ray Train's split hands out whole blocks, so one rank may hold more of a pass than another
    (equal totals over the run). DDP hangs when ranks take different numbers of steps: the epoch
    must end on both when one runs out, and the other's extra batches open its next epoch. Two
    real processes, a real gloo all-reduce."""
    import torch.multiprocessing as mp
    from clusters import free_port

    passes = [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]  # rank 0: 3 batches of pass 0; rank 1: 5
    mp.spawn(_lockstep_rank, args=(free_port(), passes, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert [len(e) for e in rank0] == [len(e) for e in rank1] == [3, 2, 0]
    assert rank0 == [[0, 1, 2], [3, 4], []]
    assert rank1 == [[10, 11, 12], [13, 14], []]  # its two extra pass-0 batches: next epoch, not lost


@pytest.mark.ray
def test_a_run_whose_training_files_all_fail_stops_before_training(ray_session, synthetic, tmp_path):
    """A moved data root: every epoch is in one Ray Data execution, which would try every file of
    every epoch before the first could end empty. A sample decoded on the cluster stops it first."""
    from cxrray.train import NoReadableImages, train

    df, space = read_manifest(synthetic / "manifest.parquet")
    df["path"] = [str(tmp_path / "moved" / Path(p).name) for p in df["path"]]
    moved = write_manifest(df, space, tmp_path / "moved.parquet")
    cfg = demo_config(synthetic, f"manifest={moved}", f"storage_path={tmp_path / 'runs'}", "epochs=30",
                      "run_name=moved")
    with pytest.raises(NoReadableImages, match=r"not one of 16 training images sampled from .* could be read "
                                               r"\(first: \w+: .*moved"):
        train(cfg)
    assert not list((tmp_path / "runs").glob("moved/checkpoint_*"))  # no epoch ran


def test_an_epoch_that_read_no_image_stops_training():
    """Unreadable files are skipped one at a time (data.decode_files); when that leaves nothing
    (moved data, wrong root) the run must fail with the reason, not "train" on zero images."""
    from cxrray.train import NoReadableImages, _check_images_were_read

    cfg = TrainConfig(manifest="m.parquet")
    _check_images_were_read({"epoch": 1, "train_images": 32, "val_images": 8}, cfg)
    with pytest.raises(NoReadableImages, match="not one train image of m.parquet"):
        _check_images_were_read({"epoch": 1, "train_images": 0, "val_images": 8}, cfg)
    with pytest.raises(NoReadableImages, match="not one val image"):
        _check_images_were_read({"epoch": 3, "train_images": 32, "val_images": 0}, cfg)

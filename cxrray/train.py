"""Ray Train wiring: TorchTrainer -> thin worker loop -> `engine` functions.

The worker loop only unpacks config, restores a checkpoint, gets its data shard, prepares
the model and calls plain epoch functions. Rank 0 evaluates the (unsplit) validation set,
broadcasts the metrics so every rank takes the same early-stopping decision, and writes the
artifacts; every rank calls `ray.train.report` once per epoch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from cxrray import storage, tracking
from cxrray.artifact import ModelMeta, read_meta, save_artifact, unwrap, write_local
from cxrray.config import TrainConfig, build, save_config, to_dict
from cxrray import console
from cxrray.console import Progress, setup_worker_logging
from cxrray.engine import Precision, cosine_lr, predict_batches, score_predictions, set_lr, train_one_epoch
from cxrray.labels import LabelSpace, TargetMap, resolve_label_names
from cxrray.losses import ClassWeights, make_loss, upsample_rare
from cxrray.manifest import read_manifest, require_split_column
from cxrray.models import build_model, gradcam_layer_path
from cxrray.transforms import Augment, Preprocess

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"


@dataclass
class TrainResult:
    run_dir: str  # an absolute local path or the storage URI (s3://...)
    best_artifact: str
    last_artifact: str
    best_val_mean_auroc: float | None
    epochs_done: int
    history: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def preprocess_for(cfg: TrainConfig) -> Preprocess:
    if cfg.pretrained:
        return Preprocess(size=cfg.image_size, channels=cfg.channels)  # ImageNet statistics
    # From scratch the grey channel is centred with fixed chest X-ray-ish statistics.
    return Preprocess(size=cfg.image_size, channels=cfg.channels, mean=(0.5,) * 3, std=(0.25,) * 3)


def augment_for(cfg: TrainConfig) -> Augment:
    return Augment(scale=tuple(cfg.aug_scale), rotation=cfg.aug_rotation, brightness=cfg.aug_brightness,
                   contrast=cfg.aug_contrast, hflip=cfg.hflip)


def select_labels(df: pd.DataFrame, space: LabelSpace, cfg: TrainConfig) -> LabelSpace:
    names = resolve_label_names(cfg.labels, space.names)
    return space.select(names) if names != space.names else space


def data_fingerprint(df: pd.DataFrame) -> str:
    ids = "\n".join(sorted(df["image_id"].astype(str) + ":" + df["split"].astype(str)))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


# --- the worker loop ------------------------------------------------------------------------------


def _restore(model: torch.nn.Module) -> dict | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True))
        state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
    log.info("resumed from checkpoint after epoch %d", state["epoch"])
    return state


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    holder = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    setup_worker_logging(config.get("verbose", False))  # cxrray's lines; Ray's only when verbose
    cfg = build(TrainConfig, config["cfg"])
    space = LabelSpace.from_dict(config["space"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))  # Ray starts workers with OMP_NUM_THREADS=1
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    precision = Precision.resolve(cfg.precision, device)
    channels_last = device.type == "cuda"

    pre = Preprocess.from_dict(config["preprocess"])
    model = build_model(cfg.model, space.num_outputs, pre, pretrained=cfg.pretrained,
                        freeze_backbone=cfg.freeze_backbone)
    state = _restore(model)
    if not state and cfg.init_from:  # stage 2 of a two-stage recipe; a resumed run has its own weights
        from cxrray.artifact import load_artifact

        model.load_state_dict(load_artifact(cfg.init_from)[0].state_dict())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1) \
        if cfg.scheduler == "plateau" else None
    weights = ClassWeights(**config["class_weights"]) if config.get("class_weights") else None
    loss_fn = make_loss(cfg.loss, space, weights, label_smoothing=cfg.label_smoothing)

    start_epoch, best, history, stale = 0, None, [], 0
    best_thresholds = [0.5] * space.num_classes
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if plateau is not None and state.get("plateau"):
            plateau.load_state_dict(state["plateau"])
        start_epoch, best, stale = state["epoch"], state["best"], state["stale"]
        history = json.loads(state["history"])
        best_thresholds = json.loads(state["best_thresholds"])

    run_dir = config["run_dir"]  # local or a URI: artifacts go through storage, never a node's own disk
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    epoch_batches = _epoch_batches(train_shard, cfg, config["train_passes"], world, device)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.scheduler == "cosine":
            set_lr(optimizer, cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.warmup_epochs))
        batches = next(epoch_batches)
        stats = train_one_epoch(model, batches, optimizer, loss_fn, device=device, precision=precision,
                                scaler=scaler, grad_clip=cfg.grad_clip, channels_last=channels_last,
                                max_steps=cfg.max_steps_per_epoch,
                                progress=_epoch_progress(epoch, cfg, config["n_train"], rank, world))
        row = None
        if rank == 0:
            probs, targets, vloss = predict_batches(unwrap(model), valid_shard.iter_torch_batches(batch_size=128),
                                                    space, loss_fn, device=device, precision=precision,
                                                    channels_last=channels_last)
            metrics, thresholds = score_predictions(space, probs, targets)
            row = {"epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": vloss,
                   "val_mean_auroc": metrics.mean_auroc, "val_auroc": metrics.auroc_by_class(),
                   "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": stats["images_per_s"] * world,
                   "thresholds": thresholds, "train_images": stats["images"] * world, "val_images": len(probs)}
        row = _broadcast(row, rank, world)
        _check_images_were_read(row, cfg)
        history.append(row)
        score = row["val_mean_auroc"] if row["val_mean_auroc"] is not None else -row["val_loss"]
        improved = best is None or score > best
        if improved:
            best, stale, best_thresholds = score, 0, row["thresholds"]
        else:
            stale += 1
        if plateau is not None:
            plateau.step(score)
        stop = bool(cfg.early_stopping_patience and stale >= cfg.early_stopping_patience)
        metrics_out = {k: v for k, v in row.items() if k not in ("val_auroc", "thresholds")}
        metrics_out.update(best_val_mean_auroc=best, stopped_early=stop)
        if rank == 0:
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_mean_auroc %s  %.0f img/s%s",
                     epoch + 1, cfg.epochs, row["train_loss"], row["val_loss"],
                     f"{row['val_mean_auroc']:.4f}" if row["val_mean_auroc"] is not None else "n/a",
                     row["train_images_per_s"], "  (best)" if improved else "")
            tracking.log_epoch(config.get("tracking"), row, best=best,
                               roc=(space, targets, probs, metrics) if improved else None)
            meta = _meta(cfg, config, space, pre, row["thresholds"], history)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = write_local(Path(tmp) / "checkpoint", model, meta)
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best, "stale": stale,
                            "history": json.dumps(history), "best_thresholds": json.dumps(best_thresholds),
                            "plateau": plateau.state_dict() if plateau is not None else None},
                           ckpt_dir / TRAIN_STATE)
                # Plain artifacts beside Ray's checkpoints, published through the run's storage
                # (rank 0 may sit on any node): what scoring and serving load.
                save_artifact(storage.join(run_dir, "artifacts", "last"), model, meta)
                if improved:
                    save_artifact(storage.join(run_dir, "artifacts", "best"),
                                  model, _meta(cfg, config, space, pre, best_thresholds, history))
                ray.train.report(metrics_out, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
        else:
            ray.train.report(metrics_out)
        if stop:
            if rank == 0:
                log.info("early stopping: no val mean AUROC gain for %d epochs", stale)
            break


def _epoch_batches(shard, cfg: TrainConfig, passes: int, world: int, device: torch.device) -> Iterator[Iterable]:
    """Each epoch's training batches.

    passes > 1 (raw files, `data.files_dataset(epochs=...)`): one execution feeds the whole run;
    epoch k is pass k of it, the rows tagged k (`data.PassStream`), whatever number of them a
    pass turns out to hold after unreadable files. With several workers, each takes its own
    rows of the pass, and the epoch ends on every worker when one of them has no more
    (`_in_lockstep`). With max_steps_per_epoch, an epoch stops early and the next goes on from
    there. A resumed run reads the passes from the first again and stops early: each of its
    epochs is still one whole pass, in the order an earlier epoch had.

    passes == 1 (shards, or a one-epoch run): the dataset is executed every epoch, through a
    local shuffle buffer.
    """
    if passes == 1:
        while True:
            yield shard.iter_torch_batches(batch_size=cfg.batch_size, prefetch_batches=2,
                                           local_shuffle_buffer_size=4 * cfg.batch_size)
    else:
        from cxrray.data import PassStream

        # No local shuffle buffer: each pass is already a seeded permutation of every row, and a
        # buffer would carry rows across the pass boundary.
        stream = PassStream(shard.iter_torch_batches(batch_size=cfg.batch_size, prefetch_batches=2))
        for k in itertools.count():
            yield _in_lockstep(stream.epoch(k), stream, world, device)


def _in_lockstep(batches: Iterator[dict], stream, world: int, device: torch.device) -> Iterator[dict]:
    """An epoch's batches while every worker still has one: DDP needs the same number of steps
    on every rank, and Ray Train's split hands out whole blocks, so the workers' shares of a
    pass differ by up to a block. Before each step the ranks agree (one small all-reduce); a
    batch taken but not used goes back to the stream and opens the next epoch."""
    from cxrray.data import untagged

    for batch in itertools.chain(batches, [None]):
        if world > 1:
            have = torch.tensor([0 if batch is None else 1], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
            if not have.item():
                if batch is not None:
                    stream.put_back(batch)
                return
        if batch is None:
            return
        yield untagged(batch)


def _epoch_progress(epoch: int, cfg: TrainConfig, n_train: int, rank: int, world: int) -> Progress:
    """Rank 0 reports steps within the epoch (its stderr is relayed, so: a line every N s)."""
    steps = math.ceil(n_train / world / cfg.batch_size)  # streaming_split gives each rank n/world rows
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return Progress(f"epoch {epoch + 1}/{cfg.epochs}", steps, unit="steps", rate_unit="img", enabled=rank == 0,
                    logger=log)


class NoReadableImages(ValueError):  # a ValueError: the CLI prints it as one line, as other data errors
    """Not one training or validation image could be read: every file of an epoch failed to
    load, or every file of the pre-flight sample (`_probe_training_files`)."""


PROBE_FILES = 16


def _probe_training_files(train_df: pd.DataFrame, pre: Preprocess, cfg: TrainConfig) -> None:
    """Before a run on raw files: decode a seeded sample of its training files in one Ray task
    (on the cluster, like the decode tasks, not on the driver, whose disks may differ), and stop
    with NoReadableImages when not one of them reads (a moved data root, a wrong bucket).

    The run holds every epoch in one execution (data.files_dataset(epochs=)), so it would
    otherwise try every file of every epoch before its first epoch could end empty: on object
    storage, a request per file per epoch.
    """
    import ray

    from cxrray.data import probe_files

    sample = train_df["path"].sample(n=min(PROBE_FILES, len(train_df)), random_state=cfg.seed).astype(str).tolist()
    readable, first = ray.get(ray.remote(num_cpus=1)(probe_files).remote(sample, pre))
    if sample and readable == 0:
        raise NoReadableImages(
            f"not one of {len(sample)} training images sampled from {cfg.manifest} could be read (first: {first}): "
            f"check that the manifest's paths exist on every node")


def _check_images_were_read(row: dict, cfg: TrainConfig) -> None:
    """Unreadable files are skipped one by one (data.decode_files); if that leaves nothing, stop
    instead of "training" on zero images for every epoch. Every rank sees the same broadcast
    row, so all of them raise together."""
    for split in ("train", "val"):
        if row[f"{split}_images"] == 0:
            raise NoReadableImages(
                f"epoch {row['epoch']}: not one {split} image of {cfg.manifest} could be read (see the "
                f"'skipping unreadable images' warnings): check that the manifest's paths exist on "
                f"every node")


def _meta(cfg: TrainConfig, config: dict, space: LabelSpace, pre: Preprocess, thresholds, history) -> ModelMeta:
    best_row = max(history, key=lambda r: r["val_mean_auroc"] or -1)
    summary = {"epochs": len(history), "best_epoch": best_row["epoch"], "val_mean_auroc": best_row["val_mean_auroc"],
               "val_auroc": best_row["val_auroc"], "history": [{k: v for k, v in r.items() if k != "thresholds"}
                                                              for r in history],
               "data_fingerprint": config["fingerprint"], "n_train": config["n_train"], "n_valid": config["n_valid"],
               "labels": config.get("labels", {})}
    return ModelMeta(cfg.model, space, pre, [float(t) for t in thresholds], gradcam_layer_path(cfg.model),
                     summary=summary, config=to_dict(cfg))


# --- the driver -----------------------------------------------------------------------------------


def check_init_from(cfg: TrainConfig, space: LabelSpace) -> None:
    """init_from must hold weights this run's model can take: the same architecture, classes and
    head, and the same input channels. Checked on the driver, before any worker starts."""
    meta = read_meta(cfg.init_from)
    problems = []
    if meta.architecture != cfg.model:
        problems.append(f"model {meta.architecture}, not {cfg.model}")
    if meta.label_space.names != space.names or meta.label_space.num_outputs != space.num_outputs:
        problems.append(f"classes {list(meta.label_space.names)} ({meta.label_space.num_outputs} outputs), not "
                        f"{list(space.names)} ({space.num_outputs})")
    if meta.preprocess.channels != cfg.channels:
        problems.append(f"{meta.preprocess.channels} input channels, not {cfg.channels}")
    if problems:
        raise ValueError(f"init_from {cfg.init_from}: its model cannot start this run: {'; '.join(problems)}")
    log.info("starting from the weights of %s (model %s)", cfg.init_from, meta.model_id)


def _log_label_policy(labels: dict) -> None:
    excluded = {k: v for k, v in labels["validation_excluded"].items() if v["uncertain"] or v["blank"]}
    detail = "; ".join(f"{k} {v['uncertain']} uncertain, {v['blank']} blank" for k, v in excluded.items())
    log.info("labels: training on %s; validating on %s%s", labels["train"], labels["validation"],
             f" (left out of validation: {detail})" if detail else "")


def ensure_manifest(cfg: TrainConfig) -> str:
    """Build the configured manifest (with its patient split and the leakage check, as
    `cxrray manifest` does) when it does not exist yet."""
    path = storage.normalize(cfg.manifest)
    if storage.exists(path):
        return path
    if not (cfg.source and cfg.root):
        raise FileNotFoundError(f"manifest {path} does not exist and no source/root is configured to build it")
    from cxrray.manifest_build import build_manifest

    return build_manifest(replace(cfg.manifest_config(), out=path)).path


def init_ray(address: str | None, worker_cpus: int) -> bool:
    """Join the cluster at `address`, or start a local one. Locally, the CPU count is raised so
    that the train workers never starve Ray Data's decode tasks (which would deadlock a 2-core
    machine: both cores held by workers waiting for batches nobody can decode).
    Returns True when this call started a local cluster (the caller then owns its shutdown)."""
    import os

    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set for `ray job submit` drivers
    if address:
        ray.init(address=address, configure_logging=False)
        console.after_ray_init()
        return False
    cores = os.cpu_count() or 1
    with console.local_dashboard() as dashboard:  # Ray Train's actors need its State API
        ray.init(num_cpus=max(cores, worker_cpus + 2), configure_logging=False, **dashboard)
    console.after_ray_init()
    return True


def shared_storage_warning(storage_path: str, alive_nodes: int) -> str | None:
    """Ray Train needs storage every node can reach; a local path is only that on one node
    (or on an NFS mount, which cxrray cannot tell from a local disk)."""
    if alive_nodes <= 1 or storage.is_uri(storage_path):
        return None
    return (f"storage_path {storage.normalize(storage_path)} is a local path but the cluster has {alive_nodes} "
            "nodes: checkpoints and artifacts are shared only if it is a shared mount (NFS) on every node; "
            "otherwise use s3://... or gs://...")


def warn_if_storage_not_shared(cfg: TrainConfig) -> None:
    import ray

    warning = shared_storage_warning(cfg.storage_path, sum(1 for n in ray.nodes() if n.get("Alive")))
    if warning:
        log.warning("%s", warning)


def use_gpu(cfg: TrainConfig) -> bool:
    if isinstance(cfg.use_gpu, bool):
        return cfg.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def train(cfg: TrainConfig) -> TrainResult:
    """Train one model, or with seeds > 1 / tta one per seed and publish their ensemble as
    `<run_dir>/artifacts/best` (cxrray.ensemble): an artifact every consumer loads like any other."""
    if cfg.seeds == 1 and not cfg.tta:
        return train_one(cfg)
    from cxrray.ensemble import DEFAULT_TTA, build_ensemble

    start = time.time()
    storage.check_store(cfg.storage_path, what="storage_path")
    manifest = ensure_manifest(cfg)  # once, with the run's own seed: every member trains on one split
    members, histories = [], []
    for k in range(cfg.seeds):
        # Each member is a run of its own under <run_dir>/members/ (re-running resumes each),
        # tracked in the run's MLflow store.
        member = replace(cfg, seed=cfg.seed + k, seeds=1, tta=False, run_name=f"seed{cfg.seed + k}",
                         storage_path=storage.join(cfg.run_dir, "members"), manifest=manifest,
                         tracking_uri=tracking.tracking_uri_for(cfg),
                         experiment=cfg.experiment)
        log.info("ensemble member %d/%d: seed %d", k + 1, cfg.seeds, member.seed)
        res = train_one(member)
        members.append(res.best_artifact)
        histories.append(res.history)
    save_config(cfg, storage.join(cfg.run_dir, "config.yaml"))
    best = storage.join(cfg.run_dir, "artifacts", "best")
    build_ensemble(members, manifest, best, tta=DEFAULT_TTA if cfg.tta else (), val_labels=cfg.val_labels,
                   ray_address=cfg.ray_address)
    meta = read_meta(best)
    return TrainResult(cfg.run_dir, best, best, meta.summary.get("val_mean_auroc"), sum(len(h) for h in histories),
                       histories[0], time.time() - start)


def train_one(cfg: TrainConfig) -> TrainResult:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxrray.data import files_dataset, ordered_ingest, shards_dataset

    start = time.time()
    # Before Ray starts: a missing bucket or refused credentials is one line, not a worker traceback.
    storage.check_store(cfg.storage_path, what="storage_path")
    storage.check_target(storage.join(cfg.storage_path, cfg.run_name), folder=True, what="storage_path/run_name")
    storage.check_store(cfg.manifest, what="manifest")
    init_ray(cfg.ray_address, cfg.num_workers * cfg.cpus_per_worker)
    warn_if_storage_not_shared(cfg)
    # Ray Data's per-operator bars, relayed from every train worker, drown the per-epoch log
    # lines that are this job's progress report.
    ray.data.DataContext.get_current().enable_progress_bars = False
    df, data_space = read_manifest(ensure_manifest(cfg))
    data_space = select_labels(df, data_space, cfg)
    uncertainty = cfg.uncertainty_policy()
    space = data_space.for_model(uncertainty)  # the model's: a 3-way head per label under U-MultiClass
    # The one place labels become targets: the training policy for the loss, the validation
    # policy (certain labels by default) for validation AUROC and the thresholds.
    train_targets = TargetMap.training(data_space, uncertainty)
    valid_targets = TargetMap.evaluation(data_space, cfg.val_labels, uncertainty)
    require_split_column(df, cfg.manifest)
    train_df = df[df["split"] == "train"]
    valid_df = df[df["split"] == "valid"]
    if len(train_df) == 0 or len(valid_df) == 0:
        raise ValueError(f"{cfg.manifest}: needs train and valid rows (has {df['split'].value_counts().to_dict()})")
    if cfg.upsample:
        train_df = upsample_rare(train_df, space, seed=cfg.seed)
    pre = preprocess_for(cfg)
    aug = augment_for(cfg)
    if cfg.init_from:
        check_init_from(cfg, space)
    if cfg.data_format == "shards":
        if not cfg.shards_dir:
            raise ValueError("data_format=shards needs shards_dir (written by `cxrray prepare`)")
        train_ds = shards_dataset(cfg.shards_dir, "train", data_space, pre, aug, cfg.batch_size, shuffle=True,
                                  targets=train_targets)
        valid_ds = shards_dataset(cfg.shards_dir, "valid", data_space, pre, None, 128, targets=valid_targets)
        train_passes = 1
    else:
        _probe_training_files(train_df, pre, cfg)
        # shuffle: manifests come in folder/patient order (Kermany's is sorted by class).
        # Every epoch in one dataset: one Ray Data execution for the run (see files_dataset).
        train_ds = files_dataset(train_df, data_space, pre, aug, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 targets=train_targets, epochs=cfg.epochs)
        train_passes = cfg.epochs
        valid_ds = files_dataset(valid_df, data_space, pre, None, 128, targets=valid_targets)
    cells = list(data_space.columns)
    weights = ClassWeights.from_labels(train_targets(train_df[cells].to_numpy(np.float32)))
    labels = {"train": train_targets.name, "validation": valid_targets.name,
              "validation_excluded": valid_targets.excluded(valid_df[cells].to_numpy(np.float32), data_space.names)}
    _log_label_policy(labels)
    run_dir = cfg.run_dir
    storage.makedirs(run_dir)
    save_config(cfg, storage.join(run_dir, "config.yaml"))
    track = tracking.start(cfg, run_dir, {"n_train": len(train_df), "n_valid": len(valid_df),
                                          "fingerprint": data_fingerprint(df), "labels": ",".join(space.names)})
    gpu = use_gpu(cfg)
    # Raw files: the passes stay in order through Train's split (an epoch is one pass).
    ingest = {"train": ordered_ingest()} if train_passes > 1 else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg), "space": space.to_dict(), "preprocess": pre.to_dict(),
            "class_weights": {"pos": weights.pos, "neg": weights.neg}, "run_dir": run_dir,
            "fingerprint": data_fingerprint(df), "n_train": len(train_df), "n_valid": len(valid_df),
            "train_passes": train_passes,  # > 1: one dataset holds every epoch (_epoch_batches)
            "labels": labels,  # the policies, recorded in model.json
            "tracking": track,  # MLflow: rank 0 logs each epoch to this run (None: tracking off)
            "verbose": console.verbose(),  # -v: Ray's own lines on the workers too
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.resolved_storage(),  # a URI goes as it is
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=console.train_logging_config()),
        datasets={"train": train_ds, "valid": valid_ds},
        # valid is not split: rank 0 scores all of it so AUROC sees every image once.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    log.info("training %s on %d train / %d valid images, %d workers (%s), run dir %s", cfg.model, len(train_df),
             len(valid_df), cfg.num_workers, "GPU" if gpu else "CPU", run_dir)
    result = trainer.fit()
    tracking.finish(track, run_dir, failed=result.error is not None)
    best_dir, last_dir = storage.join(run_dir, "artifacts", "best"), storage.join(run_dir, "artifacts", "last")
    if result.error and not storage.exists(storage.join(last_dir, "model.json")):
        raise result.error
    history = read_meta(last_dir).summary["history"]
    best = max((r["val_mean_auroc"] for r in history if r["val_mean_auroc"] is not None), default=None)
    if result.error:
        raise result.error
    return TrainResult(run_dir, best_dir, last_dir, best, len(history), history, time.time() - start)

"""Training-throughput benchmark (not a test): a Ray Train worker vs a plain PyTorch loop.

Same model, batch, optimiser (AdamW), loss (cross-entropy, 2 classes) and step function
(`cxrray.engine.train_one_epoch`) on the same synthetic uint8 images, on CPU:

  plain     this process, torch.set_num_threads(--cpus), batches sliced from an in-memory array
  ray_mem   a TorchTrainer with 1 worker (cpus_per_worker=--cpus), set up as `cxrray.train`'s
            worker loop does (set_num_threads, prepare_model), batches from the same in-memory array
  ray_data  as ray_mem, but batches come through Ray Data: get_dataset_shard("train")
            .iter_torch_batches(prefetch_batches=2, local_shuffle_buffer_size=4*batch), as in training

Paired and interleaved, because the machine is shared and its load swings by 10x within
minutes: the plain model and one Ray worker both stay alive, warmed up (--warmup steps, not
timed), and take turns for --rounds rounds of --steps timed steps each (the idle one waits on a
file, using no CPU). The ratio is the median of the per-round ratios ray/plain. Beside
wall-clock images/s, images per CPU-second of the training process. Worker start-up is reported
apart. Results: benchmarks/results/train.md.

    python benchmarks/bench_train.py --models small_cnn:128 densenet121:128 --cpus 2 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import environment, publish  # noqa: E402

log = logging.getLogger("bench_train")


def synthetic(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    return images, labels


def cycle(images: np.ndarray, labels: np.ndarray, batch: int):
    """Endless batch dicts sliced from in-memory arrays, in a new random order each pass."""
    rng = np.random.default_rng(0)
    while True:
        order = rng.permutation(len(images))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            yield {"image": torch.from_numpy(images[idx]), "labels": torch.from_numpy(labels[idx])}


class Stepper:
    """A model, its optimiser and an endless batch iterator; `round()` runs timed steps."""

    def __init__(self, cfg: dict, model, batches, device):
        from cxrray.labels import KERMANY_2, MULTICLASS, LabelSpace
        from cxrray.losses import make_loss

        self.cfg, self.model, self.device = cfg, model, device
        self.loss_fn = make_loss("ce", LabelSpace(KERMANY_2, MULTICLASS))
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
        self.it = iter(batches)
        self._steps(cfg["warmup"])  # allocator, oneDNN primitive caches, Ray Data start-up

    def _steps(self, n: int) -> dict:
        from cxrray.engine import train_one_epoch

        return train_one_epoch(self.model, self.it, self.opt, self.loss_fn, device=self.device, grad_clip=1.0,
                               max_steps=n)

    def round(self) -> dict:
        cpu0 = time.process_time()
        stats = self._steps(self.cfg["steps"])
        cpu = time.process_time() - cpu0
        assert stats["images"] == self.cfg["steps"] * self.cfg["batch"], stats
        # CPU time of the training process (all its threads): how much work a step costs,
        # whatever share of the cores this shared machine gave us.
        return {"images_per_s": stats["images_per_s"], "seconds": stats["seconds"], "cpu_s": cpu,
                "images_per_cpu_s": stats["images"] / cpu, "threads": torch.get_num_threads()}


def build(cfg: dict):
    from cxrray.models import build_model
    from cxrray.transforms import Preprocess

    torch.manual_seed(0)
    pre = Preprocess(size=cfg["size"], channels=1, mean=(0.5,), std=(0.25,))
    return build_model(cfg["model"], 2, pre)


def wait_for(path: Path, timeout: float = 3600) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def worker_loop(cfg: dict) -> None:
    """What `cxrray.train.train_loop_per_worker` does before its epoch loop, then turn-taking rounds."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, cfg["cpus"]))  # Ray starts workers with OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build(cfg))
    if cfg["variant"] == "ray_data":
        shard = ray.train.get_dataset_shard("train")

        def batches():
            while True:  # one epoch per pass, re-executed like a training epoch
                yield from shard.iter_torch_batches(batch_size=cfg["batch"], prefetch_batches=2,
                                                    local_shuffle_buffer_size=4 * cfg["batch"])
    else:
        images, labels = synthetic(cfg["n"], cfg["size"])

        def batches():
            return cycle(images, labels, cfg["batch"])
    stepper = Stepper(cfg, model, batches(), device)
    sync = Path(cfg["sync_dir"])
    (sync / "ready.json").write_text(json.dumps({"setup_s": time.perf_counter() - t_start}))
    for r in range(cfg["rounds"]):
        wait_for(sync / f"go_{r}")
        (sync / f"ray_{r}.json").write_text(json.dumps(stepper.round()))
    ray.train.report({"rounds": cfg["rounds"]})


def to_batch(batch: dict) -> dict:
    """from_numpy's "data" column -> the pipeline's batch dict (labels alternate; only speed matters)."""
    n = len(batch["data"])
    return {"image": batch["data"], "labels": np.eye(2, dtype=np.float32)[np.arange(n) % 2]}


def paired(cfg: dict, plain: Stepper, storage: str) -> dict:
    """Start a one-worker TorchTrainer in a thread; alternate plain and Ray rounds."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sync = Path(tempfile.mkdtemp(prefix="sync_", dir=storage))
    cfg = {**cfg, "sync_dir": str(sync)}
    datasets = {}
    if cfg["variant"] == "ray_data":
        images, _ = synthetic(cfg["n"], cfg["size"])
        datasets["train"] = ray.data.from_numpy(images).map_batches(to_batch, batch_format="numpy")
    trainer = TorchTrainer(worker_loop, train_loop_config=cfg, datasets=datasets,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                        resources_per_worker={"CPU": cfg["cpus"]}),
                           run_config=RunConfig(name=f"bench_{cfg['model']}_{time.time_ns()}", storage_path=storage))
    box: dict = {}
    t0 = time.perf_counter()
    thread = threading.Thread(target=lambda: box.update(result=trainer.fit()), daemon=True)
    thread.start()
    wait_for(sync / "ready.json")
    ready_s = time.perf_counter() - t0
    rounds = []
    for r in range(cfg["rounds"]):
        p = plain.round()
        (sync / f"go_{r}").touch()
        wait_for(sync / f"ray_{r}.json")
        q = json.loads((sync / f"ray_{r}.json").read_text())
        rounds.append({"plain": p, "ray": q, "ratio": q["images_per_s"] / p["images_per_s"],
                       "cpu_ratio": q["images_per_cpu_s"] / p["images_per_cpu_s"]})
        log.info("%s %s@%d round %d: plain %.2f img/s, %s %.2f img/s (x%.2f); img/CPU-s %.2f vs %.2f",
                 cfg["variant"], cfg["model"], cfg["size"], r + 1, p["images_per_s"], cfg["variant"],
                 q["images_per_s"], rounds[-1]["ratio"], p["images_per_cpu_s"], q["images_per_cpu_s"])
    thread.join()
    if box["result"].error:
        raise box["result"].error
    med = lambda key, side=None: statistics.median(x[side][key] if side else x[key] for x in rounds)  # noqa: E731
    return {"variant": cfg["variant"], "worker_start_s": ready_s, "setup_s": json.loads((sync / "ready.json").read_text())["setup_s"],
            "median_ratio": med("ratio"), "median_cpu_ratio": med("cpu_ratio"),
            "plain_images_per_s": med("images_per_s", "plain"), "ray_images_per_s": med("images_per_s", "ray"),
            "plain_images_per_cpu_s": med("images_per_cpu_s", "plain"),
            "ray_images_per_cpu_s": med("images_per_cpu_s", "ray"), "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small_cnn:128", "densenet121:128"], help="name:size")
    p.add_argument("--cpus", type=int, default=2, help="torch threads = cpus_per_worker")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--variants", nargs="+", default=["ray_mem", "ray_data"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    storage = tempfile.mkdtemp(prefix="bench_train_")
    # Our own local cluster (never someone else's); 2 CPUs beyond the worker's, as
    # `cxrray.train.init_ray` does, so Ray Data is never starved.
    ray.init(address="local", num_cpus=args.cpus + 2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(args.cpus)
    results = []
    try:
        for spec in args.models:
            name, size = spec.split(":")
            cfg = {"model": name, "size": int(size), "batch": args.batch, "cpus": args.cpus, "warmup": args.warmup,
                   "steps": args.steps, "rounds": args.rounds}
            cfg["n"] = max(512, (args.warmup + args.rounds * args.steps) * args.batch)
            images, labels = synthetic(cfg["n"], cfg["size"])
            plain = Stepper(cfg, build(cfg), cycle(images, labels, args.batch), torch.device("cpu"))
            for v in args.variants:
                res = paired({**cfg, "variant": v}, plain, storage)
                log.info("%s %s: median ratio %.2f (CPU-efficiency ratio %.2f)", spec, v, res["median_ratio"],
                         res["median_cpu_ratio"])
                results.append({"model": name, "size": int(size), **res})
    finally:
        ray.shutdown()
    return publish({"bench": "train", "cpus": args.cpus, "batch": args.batch, "warmup": args.warmup,
                    "steps": args.steps, "rounds": args.rounds,
                    **environment(ray=ray.__version__, torch=torch.__version__), "results": results}, args.out)


if __name__ == "__main__":
    sys.exit(main())

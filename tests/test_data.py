"""Ray Data pipeline: a small synthetic set streams into batch dicts, from files and from shards."""
from __future__ import annotations

import numpy as np
import pytest

from cxrray.data import MAX_TASK_BYTES, PASS, PassStream, _rows_per_task, files_dataset, prepare_shards, \
    read_shard_info, shards_dataset, untagged
from cxrray.labels import Policy, TargetMap, UncertaintyConfig
from cxrray.manifest import read_manifest, write_manifest
from cxrray.sources import load_source
from cxrray.sources.synthetic import SynthConfig, write_synthetic_chexpert
from cxrray.splits import assign_splits
from cxrray.transforms import Augment, Preprocess

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_chexpert(out / "syn", SynthConfig(n_patients=40, size=64, seed=3))
    res = load_source("synthetic", out / "syn", views=["frontal"], official_split=False)
    df = assign_splits(res.manifest, res.label_space, (0.6, 0.2, 0.2), seed=0)
    path = write_manifest(df, res.label_space, out / "m.parquet")
    return read_manifest(path)


def _collect(ds, batch_size=16):
    images, labels = [], []
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        assert set(batch) == {"image", "labels"}
        images.append(batch["image"].numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_files_dataset_yields_contract_batches(ray_session, small_manifest):
    df, space = small_manifest
    train = df[df["split"] == "train"]
    pre = Preprocess(size=48, channels=1)
    policy = UncertaintyConfig(Policy.ONES)
    images, labels = _collect(files_dataset(train, space, pre, None, targets=TargetMap.training(space, policy)))
    assert images.shape == (len(train), 1, 48, 48) and images.dtype == np.uint8
    assert labels.shape == (len(train), space.num_classes) and labels.dtype == np.float32
    # Labels arrive as the policy's targets of the manifest's raw cells (order may differ:
    # compare as multisets of rows): U-Ones turns -1 into 1 and blank into 0.
    cells = train[list(space.columns)].to_numpy(np.float32)
    assert (cells == -1).any() and np.isnan(cells).any()  # the raw labels hold both
    expected = np.where(cells == -1, 1.0, np.nan_to_num(cells, nan=0.0))
    assert sorted(map(tuple, labels)) == sorted(map(tuple, expected))
    # Without a map: the default training policy (U-Zeros, blank zero), so raw -1 never reaches a loss.
    _, default = _collect(files_dataset(train, space, pre, None))
    assert sorted(map(tuple, default)) == sorted(map(tuple, np.where(cells == -1, 0.0, np.nan_to_num(cells))))
    assert images.std() > 10  # real pictures, not zeros


def test_augmented_epochs_differ(ray_session, small_manifest):
    df, space = small_manifest
    rows = df[df["split"] == "valid"].head(8)
    ds = files_dataset(rows, space, Preprocess(size=48, channels=1), Augment())
    a, _ = _collect(ds)
    b, _ = _collect(ds)
    assert a.shape == b.shape and not np.array_equal(np.sort(a.ravel()), np.sort(b.ravel()))


def test_unreadable_file_is_skipped_not_fatal(ray_session, small_manifest, tmp_path):
    df, space = small_manifest
    rows = df[df["split"] == "test"].head(5).copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.iloc[0, rows.columns.get_loc("path")] = str(bad)
    images, labels = _collect(files_dataset(rows, space, Preprocess(size=32, channels=1), None))
    assert len(images) == 4 and len(labels) == 4


def test_unreadable_files_of_a_block_make_one_warning_not_one_each(small_manifest, tmp_path, caplog):
    """A moved data root fails every file of every epoch: one line per block, with a count."""
    import logging

    from cxrray.data import decode_files

    df, space = small_manifest
    rows = df[df["split"] == "test"].head(4)
    batch = {c: rows[c].to_numpy() for c in ["image_id", "path", *space.columns]}
    batch["path"] = np.array([str(tmp_path / "gone" / f"{i}.png") for i in range(3)] + [batch["path"][3]], dtype=object)
    with caplog.at_level(logging.WARNING, logger="cxrray.data"):
        out = decode_files(batch, pre=Preprocess(size=32, channels=1), aug=None, label_cols=list(space.columns))
    assert out["image"].shape == (1, 1, 32, 32) and out["labels"].shape == (1, space.num_classes)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping unreadable images: 3 of 4 in this block" in warnings[0], warnings


def test_a_block_with_unreadable_files_keeps_each_good_image_with_its_own_labels(small_manifest, tmp_path):
    """Failures between good files: the good images come out in order, each with its own row's
    labels (images are written into the block's array as they decode, skipping the failures)."""
    from cxrray.data import decode_files
    from cxrray.transforms import load_resized

    df, space = small_manifest
    rows = df[df["split"] == "train"].head(3)
    pre = Preprocess(size=32, channels=1)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = [str(p) for p in rows["path"]]
    paths = [str(bad), good[0], str(tmp_path / "gone.png"), good[1], good[2], str(bad)]
    cells = np.full((len(paths), space.num_classes), -9.0, np.float32)  # the failures' rows: never kept
    cells[[1, 3, 4]] = rows[list(space.columns)].fillna(0).to_numpy(np.float32)
    cells[[1, 3, 4], 0] = [0.0, 1.0, 0.0]  # distinct rows, so a shifted label would show
    batch = {"path": np.array(paths, dtype=object), **{c: cells[:, j] for j, c in enumerate(space.columns)}}
    out = decode_files(batch, pre=pre, aug=None, label_cols=list(space.columns))
    want = np.stack([load_resized(p, pre)[0] for p in good])
    assert out["image"].dtype == np.uint8 and np.array_equal(out["image"], want)
    np.testing.assert_array_equal(out["labels"], cells[[1, 3, 4]])


def test_only_the_files_pipeline_gives_up_ray_datas_resource_reservation(ray_session, small_manifest, tmp_path):
    """Files: paths -> one decode map, nothing downstream to reserve for; with Ray 2.60's
    reservation on, its decode tasks ran one at a time on 2 CPUs (benchmarks/results/data.md).
    Shards keep it (their Parquet read took every CPU without it), and so does every dataset
    built outside, such as scoring's actor pool."""
    import ray

    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "op_resource_reservation_enabled"):
        pytest.skip("this Ray has no operator resource reservation")
    df, space = small_manifest
    pre = Preprocess(size=48, channels=1)
    before = ctx.op_resource_reservation_enabled
    files = files_dataset(df[df["split"] == "train"], space, pre, None, shuffle=True, seed=0)
    assert files.context.op_resource_reservation_enabled is False  # kept by every derived dataset
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled == before  # restored
    assert ray.data.range(4).map_batches(lambda b: b).context.op_resource_reservation_enabled == before
    prepare_shards(df, space, tmp_path / "shards", size=48, rows_per_shard=20, progress=False)
    shards = shards_dataset(tmp_path / "shards", "train", space, pre, None, shuffle=True)
    assert shards.context.op_resource_reservation_enabled == before
    assert len(_collect(files)[0]) == int((df["split"] == "train").sum())  # and it still reads every image


def _fingerprints(images: np.ndarray) -> list[bytes]:
    return [im.tobytes() for im in images]


def _epochs(ds, epochs: int, batch_size: int = 7) -> list[list[bytes]]:
    """The images of each epoch, in order, taken as the train loop takes them (`PassStream`)."""
    stream = PassStream(ds.iter_torch_batches(batch_size=batch_size))
    out = []
    for k in range(epochs):
        batches = [untagged(b) for b in stream.epoch(k)]
        assert all(set(b) == {"image", "labels"} for b in batches)
        out.append(_fingerprints(np.concatenate([b["image"].numpy() for b in batches])))
    assert list(stream.epoch(epochs)) == []  # nothing beyond the last pass
    return out


def test_one_execution_holds_every_epoch_each_a_seeded_pass_over_every_image(ray_session, small_manifest):
    """Training reads all its epochs from one dataset (one Ray Data execution). Each epoch must be
    exactly one pass over the images, in an order of its own, and the same seed must give the same
    order (a reproducible run)."""
    df, space = small_manifest
    train = df[df["split"] == "train"]
    pre = Preprocess(size=32, channels=1)
    one_pass, _ = _collect(files_dataset(train, space, pre, None))
    every_image = sorted(_fingerprints(one_pass))
    assert len(set(every_image)) == len(train)  # distinct pictures: a fingerprint names one image

    seeded = _epochs(files_dataset(train, space, pre, None, 8, shuffle=True, seed=5, epochs=3), 3)
    for epoch in seeded:
        assert sorted(epoch) == every_image  # every image once: none lost, none twice
    assert seeded[0] != seeded[1] and seeded[1] != seeded[2] and seeded[0] != seeded[2]  # reshuffled every epoch
    assert seeded == _epochs(files_dataset(train, space, pre, None, 8, shuffle=True, seed=5, epochs=3), 3)
    other = _epochs(files_dataset(train, space, pre, None, 8, shuffle=True, seed=6, epochs=3), 3)
    assert other != seeded
    # Without shuffle: manifest order, every pass.
    plain = _epochs(files_dataset(train, space, pre, None, 8, epochs=2), 2)
    assert plain[0] == plain[1] == _fingerprints(one_pass)
    with pytest.raises(ValueError, match="epochs"):
        files_dataset(train, space, pre, None, epochs=0)


def test_unreadable_files_leave_every_epoch_one_pass_of_the_rest(ray_session, small_manifest, tmp_path):
    """An epoch is its pass's rows, however many decode: files that fail do not shift later
    epochs, and the last epoch is as full as the first."""
    df, space = small_manifest
    train = df[df["split"] == "train"].copy()
    train.iloc[:5, train.columns.get_loc("path")] = [str(tmp_path / f"moved{i}.png") for i in range(5)]
    pre = Preprocess(size=32, channels=1)
    readable = sorted(_fingerprints(_collect(files_dataset(train, space, pre, None))[0]))
    assert len(readable) == len(train) - 5
    for epoch in _epochs(files_dataset(train, space, pre, None, 8, shuffle=True, seed=1, epochs=6), 6):
        assert sorted(epoch) == readable


def test_pass_stream_cuts_at_the_pass_boundary_and_keeps_the_rest():
    tags = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # three passes, batches of 4 that span them
    batches = [{"image": np.arange(a, a + 4), PASS: np.array(tags[a:a + 4])} for a in range(0, 12, 4)]
    stream = PassStream(iter(batches))
    assert [b["image"].tolist() for b in stream.epoch(0)] == [[0, 1, 2, 3], [4, 5]]
    first_of_1 = next(stream.epoch(1))
    assert first_of_1["image"].tolist() == [6, 7]
    stream.put_back(first_of_1)  # taken but not used (another rank ran out): it comes out first
    epoch_1 = list(stream.epoch(1))
    assert [b["image"].tolist() for b in epoch_1] == [[6, 7], [8, 9]]
    assert [b[PASS].tolist() for b in epoch_1] == [[1, 1], [1, 1]]  # every column cut alike
    assert [untagged(b)["image"].tolist() for b in stream.epoch(2)] == [[10, 11]]
    assert list(stream.epoch(3)) == []
    # A row left over from an earlier pass belongs to the next epoch taken.
    late = PassStream(iter([{"image": np.array([0, 1, 2]), PASS: np.array([3, 4, 4])}]))
    assert [b["image"].tolist() for b in late.epoch(4)] == [[0, 1, 2]]


def test_decode_tasks_hold_enough_rows_to_pay_for_a_task_and_no_more_than_the_memory_cap():
    # A single pass: two tasks per CPU, so the last ones balance.
    assert _rows_per_task(1000, 32, 224, cpus=2) == 250
    # Across passes: one per CPU (the next pass fills CPUs that fall idle).
    assert _rows_per_task(1000, 32, 224, cpus=2, tasks_per_cpu=1) == 500
    # Never fewer rows than a batch.
    assert _rows_per_task(40, 32, 224, cpus=16) == 32
    # A task's output is capped in bytes, so larger images get fewer rows.
    assert _rows_per_task(10**6, 32, 224, cpus=2) == MAX_TASK_BYTES // (224 * 224) == 1337
    assert _rows_per_task(10**6, 32, 512, cpus=2) == 256
    assert _rows_per_task(10**6, 512, 1024, cpus=2) == 512  # ...but a batch still fits in one


def test_shards_round_trip_and_match_raw(ray_session, small_manifest, tmp_path):
    df, space = small_manifest
    info = prepare_shards(df, space, tmp_path / "shards", size=48, rows_per_shard=20, progress=False)
    assert info.images == df["split"].value_counts().to_dict()
    assert read_shard_info(tmp_path / "shards")["size"] == 48
    pre = Preprocess(size=48, channels=1)
    valid = df[df["split"] == "valid"]
    raw, _ = _collect(files_dataset(valid, space, pre, None))
    certain = TargetMap.evaluation(space, "certain")
    shard, labels = _collect(shards_dataset(tmp_path / "shards", "valid", space, pre, None, targets=certain))
    assert shard.shape == raw.shape and labels.shape == (len(valid), space.num_classes)
    # Shards keep the raw cells; the map applies when they are read, as for files.
    want = certain(valid[list(space.columns)].to_numpy(np.float32))
    assert sorted(map(tuple, np.nan_to_num(labels, nan=-9))) == sorted(map(tuple, np.nan_to_num(want, nan=-9)))
    assert np.array_equal(np.sort(shard.reshape(len(shard), -1).sum(1)), np.sort(raw.reshape(len(raw), -1).sum(1)))
    # A re-run keeps the existing shards (resumable prepare).
    again = prepare_shards(df, space, tmp_path / "shards", size=48, rows_per_shard=20, progress=False)
    assert again.images == info.images


def test_shards_on_s3_round_trip_like_local_ones(ray_session, small_manifest, s3_bucket, tmp_path):
    """`cxrray prepare --out s3://...` and training from s3 shards: the same rows as local shards."""
    from cxrray import storage

    df, space = small_manifest
    local = prepare_shards(df, space, tmp_path / "shards", size=48, rows_per_shard=20, progress=False)
    remote = prepare_shards(df, space, f"{s3_bucket}/shards", size=48, rows_per_shard=20, progress=False)
    assert remote.images == local.images and remote.shards == local.shards
    assert read_shard_info(f"{s3_bucket}/shards")["size"] == 48
    assert any(r.startswith("train/shard-") for r, _ in storage.list_files(f"{s3_bucket}/shards"))
    pre = Preprocess(size=48, channels=1)
    a, la = _collect(shards_dataset(tmp_path / "shards", "valid", space, pre, None))
    b, lb = _collect(shards_dataset(f"{s3_bucket}/shards", "valid", space, pre, None))
    key = lambda x: np.sort(x.reshape(len(x), -1).sum(1))  # noqa: E731 - row order may differ
    assert np.array_equal(key(a), key(b)) and la.shape == lb.shape

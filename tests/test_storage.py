"""The storage layer on a local disk and on a real S3 server (moto): atomic writes, listings,
Parquet, clear one-line refusals, and artifacts published to and loaded from a bucket."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from cxrray import storage
from cxrray.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_read_write_list_delete_round_trip(base: str) -> None:
    storage.write_json(storage.join(base, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(base, "a", "b", "y.bin"), b"\x00\x01")
    storage.write_parquet(pa.table({"v": [1, 2, 3]}), storage.join(base, "t.parquet"))
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"k": 1}
    assert storage.read_bytes(storage.join(base, "a", "b", "y.bin")) == b"\x00\x01"
    assert storage.read_parquet(storage.join(base, "t.parquet"))["v"].to_pylist() == [1, 2, 3]
    assert [r for r, _ in storage.list_files(base)] == ["a/b/y.bin", "a/x.json", "t.parquet"]
    assert storage.list_dir(storage.join(base, "a")) == ["b", "x.json"]
    assert storage.is_dir(storage.join(base, "a")) and storage.is_file(storage.join(base, "t.parquet"))
    storage.delete(storage.join(base, "t.parquet"))
    assert not storage.exists(storage.join(base, "t.parquet"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(base, "missing"))
    # Overwrites replace the content whole; no temp file is left behind.
    storage.write_bytes(storage.join(base, "a", "b", "y.bin"), b"new")
    assert storage.read_bytes(storage.join(base, "a", "b", "y.bin")) == b"new"
    assert [r for r, _ in storage.list_files(storage.join(base, "a", "b"))] == ["y.bin"]


def test_paths_normalise_and_mangled_uris_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/x") == str(tmp_path / "rel" / "x")
    assert storage.normalize(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert storage.normalize("s3://b/p/") == "s3://b/p"
    assert storage.join("s3://b/p?region=eu-west-1", "x", "y.json") == "s3://b/p/x/y.json?region=eu-west-1"
    for bad in ("s3:/bucket/runs", "gs:/b/x"):
        with pytest.raises(StorageError, match="lost a slash"):
            storage.write_text(bad, "x")
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))  # nothing named s3: was made


def test_missing_bucket_is_one_line_naming_the_uri_and_the_fix(s3_server) -> None:
    with pytest.raises(StorageError) as e:
        storage.check_store("s3://no-such-bucket-cxr/runs", what="storage_path")
    msg = str(e.value)
    assert "\n" not in msg and "s3://no-such-bucket-cxr/runs" in msg and "does not exist" in msg
    assert "aws s3 mb s3://no-such-bucket-cxr" in msg
    with pytest.raises(StorageError, match="no bucket in the URI"):
        storage.check_store("s3:///x")


def test_refused_credentials_are_one_line_with_the_fix(tmp_path: Path) -> None:
    """A second moto server that checks signatures (INITIAL_NO_AUTH_ACTION_COUNT=0): keys it
    does not know are refused, as a real S3 refuses missing or wrong credentials."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.clusters import free_port

    moto_server = Path(sys.executable).with_name("moto_server")
    if not moto_server.exists():
        pytest.skip("moto_server is not installed; `bash scripts/test.sh` installs moto[server]")
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        uri = f"s3://cxr-auth?endpoint_override=127.0.0.1:{port}&scheme=http"
        with pytest.raises(StorageError) as e:
            storage.check_store(uri, what="--out")
        msg = str(e.value)
        assert "\n" not in msg and "refused the credentials" in msg and "AWS_ACCESS_KEY_ID" in msg, msg
    finally:
        proc.kill()
        proc.wait()


def test_artifacts_publish_to_a_bucket_and_load_through_the_cache(s3_bucket, tmp_path: Path, monkeypatch) -> None:
    import torch

    from cxrray.artifact import ModelMeta, load_artifact, localize, read_meta, save_artifact
    from cxrray.labels import SYNTHETIC_FINDINGS, LabelSpace
    from cxrray.models import build_model, gradcam_layer_path
    from cxrray.transforms import Preprocess

    monkeypatch.setenv("CXRRAY_CACHE", str(tmp_path / "cache"))
    pre, space = Preprocess(size=32, channels=1), LabelSpace(SYNTHETIC_FINDINGS)
    net = build_model("tiny_cnn", space.num_outputs, pre)
    uri = save_artifact(f"{s3_bucket}/runs/r/artifacts/best",
                        net, ModelMeta("tiny_cnn", space, pre, [0.5] * 6, gradcam_layer_path("tiny_cnn")))
    assert uri == f"{s3_bucket}/runs/r/artifacts/best"
    meta = read_meta(uri)
    assert meta.model_id and len(meta.weights_sha256) == 64
    local = localize(uri)
    assert local == tmp_path / "cache" / "artifacts" / meta.model_id
    model, meta2 = load_artifact(uri)
    assert meta2.model_id == meta.model_id
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x))
    assert localize(uri) == local  # a second load reads the cache, downloads nothing new
    # A torn publish (new weights, old model.json) is never loaded: the hash does not match.
    storage.write_bytes(f"{uri}/model.pt", b"not the weights")
    for f in local.iterdir():
        f.unlink()
    local.rmdir()
    from cxrray.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="never matched the sha256"):
        localize(uri, attempts=2)


def test_a_local_storage_path_on_several_nodes_is_warned_about(tmp_path: Path) -> None:
    from cxrray.train import shared_storage_warning

    assert shared_storage_warning(str(tmp_path), 1) is None  # one node: its disk is the cluster's
    assert shared_storage_warning("s3://b/runs", 3) is None
    msg = shared_storage_warning(str(tmp_path / "runs"), 2)
    assert msg and str(tmp_path / "runs") in msg and "2 nodes" in msg and "s3://" in msg

"""runtime.inputs: storage — prepared data copied once to the job's storage and read in place
(a memory map on a shared path, ranged block reads from S3), checked against the arrays."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow.fs as pafs
import pytest

from lowlabel.data.prepared import PreparedData
from lowlabel.runner import stored_inputs
from lowlabel.runner.stored_inputs import StoredRows, open_stored, stage_prepared


@pytest.fixture()
def s3_bucket(s3_endpoint, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    name = f"inputs-{np.random.default_rng().integers(1 << 30)}"
    s3.create_dir(name)
    return f"s3://{name}/runs"


def assert_same_data(got: PreparedData, expected: PreparedData) -> None:
    for name in ("train_images", "test_images", "train_labels", "test_labels"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)[:]), np.asarray(getattr(expected, name)))
    assert got.split == expected.split and got.info == expected.info


def test_staged_once_on_a_shared_path_and_memory_mapped_there(tiny_prepared, tmp_path):
    handle, copied = stage_prepared(str(tmp_path / "shared"), tiny_prepared, cache_bytes=1 << 20)
    assert copied > 0 and handle.uri.startswith(str(tmp_path / "shared" / "inputs"))
    again, copied_again = stage_prepared(str(tmp_path / "shared"), tiny_prepared, cache_bytes=1 << 20)
    assert again == handle and copied_again == 0  # content-addressed: the second job copies nothing
    data = open_stored(handle)
    assert isinstance(data.train_images, np.memmap)
    assert_same_data(data, PreparedData.load(tiny_prepared))


def test_a_copy_cut_off_before_its_marker_is_copied_again(tiny_prepared, tmp_path):
    handle, _ = stage_prepared(str(tmp_path / "shared"), tiny_prepared, cache_bytes=1 << 20)
    (tmp_path / "shared" / "inputs" / handle.uri.rsplit("/", 1)[1] / stored_inputs.COMPLETE).unlink()
    _, copied = stage_prepared(str(tmp_path / "shared"), tiny_prepared, cache_bytes=1 << 20)
    assert copied > 0


def test_s3_rows_read_in_blocks_into_a_bounded_cache(tiny_prepared, s3_bucket, monkeypatch):
    monkeypatch.setattr(stored_inputs, "BLOCK_BYTES", 4 * 256)  # 4 rows of 16x16x1 per block
    handle, _ = stage_prepared(s3_bucket, tiny_prepared, cache_bytes=3 * 4 * 256)
    data = open_stored(handle)
    expected = PreparedData.load(tiny_prepared)
    rows = data.train_images
    assert isinstance(rows, StoredRows) and rows.shape == expected.train_images.shape and rows.dtype == expected.train_images.dtype
    assert rows.rows_per_block == 4 and rows.max_blocks == 3
    order = np.random.default_rng(0).permutation(len(rows))
    for i in order[:50]:
        np.testing.assert_array_equal(rows[int(i)], expected.train_images[i])
        assert rows.cached_bytes() <= 3 * 4 * 256
    np.testing.assert_array_equal(rows[order[:17]], expected.train_images[order[:17]])
    np.testing.assert_array_equal(rows[5:23:3], expected.train_images[5:23:3])
    np.testing.assert_array_equal(rows[-1], expected.train_images[-1])
    with pytest.raises(IndexError):
        rows[len(rows)]
    clone = pickle.loads(pickle.dumps(rows))  # a DataLoader process gets its own file and cache
    assert clone.cached_bytes() == 0
    np.testing.assert_array_equal(clone[3], expected.train_images[3])
    assert_same_data(data, expected)


@pytest.mark.slow
def test_pretrain_job_reading_inputs_from_s3_ends_with_the_object_store_runs_weights(tiny_prepared, s3_bucket, tmp_path_factory, monkeypatch):
    """Same data, same order, same weights: only where the bytes come from differs."""

    import torch
    from test_ray_train import pretrain_config

    from lowlabel.runner.launch import ensure_ray, run_training_job
    from lowlabel.runner.worker import read_state
    from lowlabel.train.pretrain import pretrain_loop

    monkeypatch.setenv("LOWLABEL_RAY_TMP", str(tmp_path_factory.mktemp("ray")))  # short: Ray socket paths
    ensure_ray(None, local_num_cpus=2)  # after the AWS variables: workers inherit them
    try:
        states = {}
        for inputs in ("object_store", "storage"):
            result = run_training_job(
                pretrain_loop, pretrain_config(tiny_prepared, None, None, epochs=1), name=f"inputs-{inputs}", workers=2, use_gpu=False,
                cpus_per_worker=1, storage_path=s3_bucket, inputs=inputs, input_cache_mb=1,
            )
            assert result.error is None, result.error
            states[inputs] = read_state(result.checkpoint)
    finally:
        import ray

        ray.shutdown()
    for key, tensor in states["object_store"]["encoder"].items():
        assert torch.equal(tensor, states["storage"]["encoder"][key]), key

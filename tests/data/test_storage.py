"""data/storage.py against a real S3-compatible server on loopback (tests/s3_server.py)."""

import pytest

from data.storage import ObjectStore, StorageError, is_remote, join


def test_urls_and_joins() -> None:
    assert is_remote("s3://b/x") and is_remote("gs://b") and not is_remote("/data/x")
    assert not is_remote(None)
    assert join("s3://b/x/", "train", "index.json") == "s3://b/x/train/index.json"
    assert join("/d", "train") == "/d/train"
    with pytest.raises(ValueError, match="names no bucket"):
        ObjectStore("s3:///x")


def test_read_write_list_delete(s3, tmp_path) -> None:
    s3.create_bucket("store-rw")
    store = ObjectStore("s3://store-rw/runs/a")
    assert not store.exists("x.txt")
    store.put_text("x.txt", "hello")
    (tmp_path / "big.bin").write_bytes(b"\x01" * 100_000)
    store.upload(tmp_path / "big.bin", "sub/big.bin")
    assert store.exists("x.txt") and store.read_text("x.txt") == "hello"
    assert store.list() == ["sub/big.bin", "x.txt"]  # relative to the store's prefix
    assert store.list("sub") == ["sub/big.bin"]
    store.download("sub/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"\x01" * 100_000
    assert not (tmp_path / "back.bin.part").exists()
    with pytest.raises(FileNotFoundError, match="s3://store-rw/runs/a/nope"):
        store.read_bytes("nope")
    store.delete_tree("sub")
    assert store.list() == ["x.txt"]
    store.delete("x.txt")
    store.delete("x.txt")  # deleting what is gone is not an error
    assert store.list() == []


def test_each_failure_is_explained(s3, s3_server, monkeypatch) -> None:
    s3.create_bucket("store-err")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: the bucket 'no-such-bucket'"):
        ObjectStore("s3://no-such-bucket/x").check_bucket()
    ObjectStore("s3://store-err/x").check_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(
        StorageError, match=r"s3://store-err/x/index.json: .*refused the credentials"
    ):
        ObjectStore("s3://store-err/x").read_bytes("index.json")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(
        StorageError,
        match=r"Cannot open s3://store-err/x: cannot reach the object store at http://127.0.0.1:9",
    ):
        ObjectStore("s3://store-err/x").check_bucket()

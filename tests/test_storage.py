"""palm.base.storage and content-addressed stage outputs on gs://, against the GCS emulator on loopback:
an upload that stops half way is never taken for a complete output, local copies are downloaded once
and follow a rebuild, exclusive creation grants one claim, and an unusable root is a clear error."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from palm.store import outputs as stages

from palm.base import storage
from palm.base.errors import PalmError
from palm.store.ledger import EvalLedger
from palm.store.outputs import MANIFEST, read_manifest, run_stage
from palm.base.net import free_port


@pytest.fixture
def root(gcs_emulator, tmp_path, monkeypatch) -> str:
    """A fresh gs:// root, with the local cache in tmp_path."""
    monkeypatch.setenv("PALM_CACHE_DIR", str(tmp_path / "cache"))
    return f"gs://bucket/{uuid.uuid4().hex[:8]}"


def writer(files: dict[str, str]):
    def build(out):
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
        return {"files": sorted(files), "where": str(out / "a.txt")}

    return build


def test_paths():
    assert storage.join("gs://b/run/", "train", "k1") == "gs://b/run/train/k1"
    assert storage.join("runs", "train", "k1") == os.path.join("runs", "train", "k1")
    assert storage.parent("gs://b/run/train/k1/") == "gs://b/run/train" and storage.name("gs://b/x/7") == "7"
    assert storage.split("gs://b/run/x") == ("b", "run/x")
    assert storage.is_remote("gs://b") and not storage.is_remote("/tmp/gs://")


def test_an_upload_that_stops_half_way_is_never_complete(root, monkeypatch, tmp_path):
    files = {"a.txt": "a", "b.txt": "b", "sub/c.txt": "c"}
    real = storage._upload_files

    def dies_after_one(fs, pairs):
        real(fs, pairs[:1])
        raise ConnectionResetError("the network went away mid-upload")

    monkeypatch.setattr(storage, "_upload_files", dies_after_one)
    with pytest.raises(ConnectionResetError):
        run_stage("data", {"a": 1}, {}, root, writer({**files, "stale.txt": "from the failed attempt"}))
    key = stages.stage_key("data", {"a": 1}, {})
    final = f"{root}/data/{key}"
    assert storage.list_files(final) == ["a.txt"]  # something was uploaded, but no manifest
    assert read_manifest(final) is None
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # the local scratch build is gone

    monkeypatch.setattr(storage, "_upload_files", real)
    built = run_stage("data", {"a": 1}, {}, root, writer(files))
    assert not built.cached and built.path == final
    assert storage.list_files(final) == sorted([*files, MANIFEST])  # the failed attempt's leftovers are gone
    assert built.manifest["where"] == f"{final}/a.txt"  # paths into the build dir point at the output
    assert read_manifest(final)["started_at"] == built.manifest["started_at"]
    again = run_stage("data", {"a": 1}, {}, root, writer({"never": "built"}))
    assert again.cached and again.manifest["files"] == sorted(files)


def test_a_stage_that_writes_remotely_itself_builds_in_place(root):
    def remote_writer(text: str, fail: bool = False):
        def build(out):
            assert isinstance(out, str) and out.startswith(f"{root}/data/")  # the final gs:// directory
            storage.write_text_atomic(f"{out}/shard-0.jsonl", text)
            if fail:
                raise RuntimeError("a Dataflow worker failed")
            return {"shards": 1}

        return build

    with pytest.raises(RuntimeError):
        run_stage("data", {"r": 1}, {}, root, remote_writer("half", fail=True), in_place=True)
    final = f"{root}/data/{stages.stage_key('data', {'r': 1}, {})}"
    assert storage.list_files(final) == ["shard-0.jsonl"] and read_manifest(final) is None
    built = run_stage("data", {"r": 1}, {}, root, remote_writer("whole"), in_place=True)
    assert not built.cached and storage.list_files(final) == [MANIFEST, "shard-0.jsonl"]
    assert (built.local() / "shard-0.jsonl").read_text() == "whole"
    assert run_stage("data", {"r": 1}, {}, root, remote_writer("never"), in_place=True).cached


def test_local_copies_are_downloaded_once_and_follow_a_rebuild(root, monkeypatch, tmp_path):
    first = run_stage("tokenizer", {"v": 1}, {}, root, writer({"tokenizer.model": "one", "sub/x": "1"}))
    downloads = []
    real = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda *a, **k: downloads.append(a[0]) or real(*a, **k))

    local = first.local()  # the build itself was kept as the local copy: nothing to download
    assert local == storage.cache_path(first.path) and local.is_relative_to(tmp_path / "cache")
    assert (local / "tokenizer.model").read_text() == "one" and downloads == []

    storage.remove_tree(tmp_path / "cache")  # another machine: an empty cache
    reused = run_stage("tokenizer", {"v": 1}, {}, root, writer({}))
    assert reused.cached and (reused.local() / "sub" / "x").read_text() == "1" and reused.local() == local
    assert downloads == [first.path]  # once

    forced = run_stage("tokenizer", {"v": 1}, {}, root, writer({"tokenizer.model": "two"}), force=True)
    storage.remove_tree(tmp_path / "cache")
    stale = run_stage("tokenizer", {"v": 1}, {}, root, writer({}))
    assert stale.manifest["started_at"] == forced.manifest["started_at"]
    assert (stale.local() / "tokenizer.model").read_text() == "two" and not (local / "sub").exists()
    assert stages.local_copy(first.path) == local  # reads the remote manifest itself, finds the copy current
    assert downloads == [first.path, first.path]

    with pytest.raises(PalmError, match="not a complete stage output"):
        stages.local_copy(f"{root}/tokenizer/nothing-here")


def test_exclusive_create_on_gs_grants_exactly_one_claim(root):
    path = f"{root}/evals/40.claim"
    barrier = threading.Barrier(8)
    wins = []

    def contend(i: int) -> None:
        barrier.wait()
        wins.append(storage.create_exclusive(path, f"owner {i}"))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert storage.read_text(path).startswith("owner ")
    modified, version = storage.stat(path)
    assert abs(modified - time.time()) < 60
    assert not storage.remove_if_unchanged(path, str(int(version) + 1))  # another version: left alone
    assert storage.remove_if_unchanged(path, version) and not storage.exists(path)
    assert not storage.remove_if_unchanged(path, version)  # only once


def test_eval_ledger_on_gs(root):
    ledger = EvalLedger(f"{root}/train/k/evals", stale_after=0.5)
    assert ledger.claim(10, "a") and not ledger.claim(10, "b")
    time.sleep(1.0)
    assert ledger.claim(10, "b")  # a died without a result: its stale claim is taken over once
    assert not ledger.claim(10, "c")
    ledger.release(10)
    assert ledger.claim(10, "c")
    ledger.record(10, {"loss": 1.0})
    ledger.record(20, {"loss": 2.0})
    assert not ledger.claim(10, "d") and ledger.result(10) == {"loss": 1.0}
    assert ledger.results() == {10: {"loss": 1.0}, 20: {"loss": 2.0}} and ledger.pending([10, 20, 30]) == [30]
    assert json.loads(storage.read_text(f"{root}/train/k/evals/10.claim"))["owner"] == "c"


def test_an_unusable_storage_root_is_a_clear_error(gcs_emulator, monkeypatch):
    storage.check_root(f"gs://bucket/{uuid.uuid4().hex[:8]}")  # usable: nothing to say
    with pytest.raises(PalmError, match="bucket gs://no-such-bucket does not exist"):
        storage.check_root("gs://no-such-bucket/run")
    with pytest.raises(PalmError, match="only local paths and gs://"):
        storage.check_root("s3://bucket/run")
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # put back afterwards, whatever gcs_settings writes
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(PalmError, match="GCS emulator at STORAGE_EMULATOR_HOST=.* does not answer"):
        storage.check_root("gs://bucket/run")
    assert time.monotonic() - t0 < 10


def test_refused_credentials_and_permissions_are_a_clear_error(monkeypatch):
    class HttpError(Exception):  # gcsfs's, without importing gcsfs before the emulator's settings
        def __init__(self, code: int):
            super().__init__(f"{code} from GCS")
            self.code = code

    class Refusing:
        def __init__(self, error: Exception):
            self.error = error

        def cat_file(self, path):
            raise self.error

    monkeypatch.setattr(storage, "_fs", lambda: Refusing(HttpError(401)))
    with pytest.raises(PalmError, match=r"gs://b/run/spec.json: .*credentials \(401\).*application-default login"):
        storage.read_text("gs://b/run/spec.json")
    monkeypatch.setattr(storage, "_fs", lambda: Refusing(OSError("Forbidden: b/run/spec.json\nno access")))
    with pytest.raises(PalmError, match=r"permission denied \(403\)"):
        storage.read_text("gs://b/run/spec.json")
    monkeypatch.setattr(storage, "_fs", lambda: Refusing(HttpError(503)))
    with pytest.raises(HttpError):  # anything else is not the user's to fix: it stays retryable
        storage.read_text("gs://b/run/spec.json")

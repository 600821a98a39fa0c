"""Where a run's files live: a local directory or `gs://bucket/prefix`, behind one small set of functions.

Paths are strings; a remote one is never turned into a `pathlib.Path`. Local paths behave exactly as
before (`os.replace` for atomic writes, `O_EXCL` for exclusive creation). On Google Cloud Storage,
through gcsfs:

- a single-object upload is atomic (the object appears whole or not at all), so `write_*_atomic` is
  one upload and `create_exclusive` is one upload with the precondition `ifGenerationMatch=0`;
- a directory is a name prefix and cannot be renamed, so `upload_dir` uploads every file first and
  the completion marker (`manifest.json`) last: an output whose upload stopped half way has no marker
  and is never taken for complete;
- what streams (the tokenizer's sample, the pack stage's input) is read in place (`open_read`), and
  what is read by row (the packed sequences, on every training host) with one bounded ranged read
  per piece (`read_range`): nothing is downloaded whole;
- tools that need local files read a local copy under the cache (`PALM_CACHE_DIR`, default
  `~/.cache/palm`), downloaded once into a temporary directory and renamed into place (`download_dir`).

Checkpoints do not go through here: Orbax writes them to `gs://` itself (TensorStore and gcsfs), see
`palm.core.checkpoint`; `gcs_settings` here points every client, Orbax's included, at STORAGE_EMULATOR_HOST
when it is set.
"""

from __future__ import annotations

import contextlib
import logging
import glob as _glob
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from palm.base.errors import PalmError

log = logging.getLogger("palm.base.storage")

SCHEME = "gs://"

_filesystems: dict[int, Any] = {}  # one gcsfs client per process (gcsfs clients are not fork-safe)


def gcs_settings() -> dict[str, str]:
    """Point every GCS client a `gs://` checkpoint goes through at STORAGE_EMULATOR_HOST, when it is set.

    STORAGE_EMULATOR_HOST (`host:port` or a URL) is the emulator convention of Google's client
    libraries and gcsfs. This is the only place in palm that reads storage settings from the environment,
    and it has to *write* some, because Orbax passes no options to the clients it uses:

    - TensorStore (the arrays, in OCDBT) opens `{"driver": "gcs", "bucket", "path"}` kvstores that Orbax
      builds itself; that driver has no endpoint field, so its endpoint is TENSORSTORE_GCS_HTTP_URL,
      read when a kvstore is opened. GOOGLE_AUTH_TOKEN_FOR_TESTING gives it a fixed bearer token, so it
      does not look for application-default credentials or a GCE metadata server (read once per process,
      on the first GCS access).
    - gcsfs (etils.epath's `gs://` backend without TensorFlow: Orbax's listings, JSON items and commit
      markers, and `quarantine`) and google-cloud-storage (Orbax's bucket lookup before listing steps)
      honour STORAGE_EMULATOR_HOST themselves; the latter only as a URL, so a bare `host:port` is
      rewritten to `http://host:port`. gcsfs also needs GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read
      when gcsfs is imported: otherwise it asks the Storage Control API, which no emulator serves, for
      each bucket's layout.

    Without STORAGE_EMULATOR_HOST nothing changes and the clients talk to GCS with their own
    credentials. Returns the variables set.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return {}
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    settings = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url.rstrip("/"),
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator"),
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    os.environ.update(settings)
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        log.warning("gcsfs was imported before STORAGE_EMULATOR_HOST was seen, with its experimental %s: it "
                    "will ask the Storage Control API for bucket layouts (and fall back when that fails)",
                    gcsfs.GCSFileSystem.__name__)
    return settings


def is_remote(path: str | os.PathLike) -> bool:
    """True for `gs://…` paths."""
    return str(path).startswith(SCHEME)


def join(root: str | os.PathLike, *parts: str) -> str:
    """`root/part/…` as a string: '/'-joined for gs://, `os.path.join` for local paths."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(str(root), *(str(p) for p in parts))


def parent(path: str | os.PathLike) -> str:
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def name(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else Path(path).name


def split(path: str) -> tuple[str, str]:
    """(bucket, object name) of a gs:// path."""
    bucket, _, key = path[len(SCHEME):].partition("/")
    return bucket, key.strip("/")


def cache_dir() -> Path:
    """Local copies of remote stage outputs, and scratch space for stages that build locally."""
    return Path(os.environ.get("PALM_CACHE_DIR") or Path.home() / ".cache" / "palm").absolute()


def cache_path(path: str) -> Path:
    """Where the local copy of a gs:// directory lives: `<cache>/gcs/<bucket>/<name>`."""
    bucket, key = split(path)
    return cache_dir() / "gcs" / bucket / key


def scratch_dir(prefix: str) -> Path:
    """A new empty local directory under the cache, for building an output before it is uploaded."""
    base = cache_dir() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# -- the gcsfs client and what its errors mean ------------------------------------------------------


def _fs() -> Any:
    fs = _filesystems.get(os.getpid())
    if fs is None:
        emulator = gcs_settings().get("STORAGE_EMULATOR_HOST")  # before gcsfs is imported
        import gcsfs

        # Listings are not cached: other processes (Orbax, other workers) write behind this client's back.
        fs = gcsfs.GCSFileSystem(token="anon" if emulator else None, use_listings_cache=False,
                                 skip_instance_cache=True)
        _filesystems[os.getpid()] = fs
    return fs


def _access_problem(error: BaseException) -> str | None:
    """What a user must fix when GCS refused a request for want of credentials or permission."""
    code = getattr(error, "code", None)
    if code == 401 or "DefaultCredentialsError" in type(error).__name__:
        return ("Google Cloud Storage did not accept the credentials (401): run `gcloud auth application-default "
                "login` or set GOOGLE_APPLICATION_CREDENTIALS (or STORAGE_EMULATOR_HOST for an emulator)")
    if code == 403 or (type(error) is OSError and str(error).startswith("Forbidden")):
        return "permission denied (403): the credentials in use may not read or write this bucket"
    return None


@contextlib.contextmanager
def _gcs(path: str) -> Iterator[Any]:
    """The gcsfs client; credential and permission failures become a PalmError naming the path."""
    try:
        yield _fs()
    except PalmError:
        raise
    except Exception as e:  # noqa: BLE001 - only access problems are translated; the rest re-raised as is
        problem = _access_problem(e)
        if problem is None:
            raise
        raise PalmError(f"{path}: {problem}") from None


def check_root(root: str | os.PathLike) -> None:
    """Fail fast, with what to change, when a storage root cannot be used (before any stage runs)."""
    root = str(root)
    if "://" in root and not is_remote(root):
        raise PalmError(f"storage root {root!r}: only local paths and gs://bucket/prefix are supported")
    if not is_remote(root):
        return
    bucket, _ = split(root)
    if not bucket:
        raise PalmError(f"storage root {root!r} names no bucket; write gs://bucket/prefix")
    emulator = gcs_settings().get("STORAGE_EMULATOR_HOST")
    if emulator:  # gcsfs retries a refused connection for half a minute; one plain connect says it at once
        url = urlparse(emulator)
        try:
            socket.create_connection((url.hostname, url.port or 80), timeout=5).close()
        except OSError as e:
            raise PalmError(f"storage root {root}: the GCS emulator at STORAGE_EMULATOR_HOST={emulator} does not "
                            f"answer ({e}); start it or unset STORAGE_EMULATOR_HOST") from None
    try:
        with _gcs(root) as fs:
            found = fs.exists(f"{SCHEME}{bucket}")
    except PalmError:
        raise
    except Exception as e:  # noqa: BLE001 - a network failure here is a setup problem, not a transient one
        raise PalmError(f"storage root {root}: cannot reach Google Cloud Storage ({type(e).__name__}: {e}); "
                        "check network access and credentials") from None
    if not found:
        raise PalmError(f"storage root {root}: bucket gs://{bucket} does not exist (or these credentials "
                        "cannot see it); create it or change infra.storage_root")


# -- files -------------------------------------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    """Whether a file (or, on gs://, any object under the prefix) exists."""
    if not is_remote(path):
        return Path(path).exists()
    with _gcs(str(path)) as fs:
        return fs.exists(str(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes; FileNotFoundError when it is missing, local or remote."""
    if not is_remote(path):
        return Path(path).read_bytes()
    with _gcs(str(path)) as fs:
        return fs.cat_file(str(path))


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_range(path: str | os.PathLike, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file: a local positioned read, or one bounded ranged GET on gs://."""
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    with _gcs(str(path)) as fs:
        return fs.cat_file(str(path), start=start, end=stop)


def open_read(path: str | os.PathLike) -> Any:
    """A binary file object streaming a file's bytes (gs:// objects are read in blocks, not downloaded)."""
    if not is_remote(path):
        return open(path, "rb")
    with _gcs(str(path)) as fs:
        return fs.open(str(path), "rb", block_size=8 << 20)


def size(path: str | os.PathLike) -> int:
    """A file's size in bytes; FileNotFoundError when it is missing."""
    if not is_remote(path):
        return os.path.getsize(path)
    with _gcs(str(path)) as fs:
        return int(fs.size(str(path)))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace a file's content all at once: readers see the old or the new content, never a part."""
    if is_remote(path):
        with _gcs(str(path)) as fs:
            fs.pipe_file(str(path), bytes(data))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create a file that must not exist yet: True for exactly one of any number of concurrent callers."""
    if is_remote(path):
        with _gcs(str(path)) as fs:
            try:
                fs.pipe_file(str(path), text.encode("utf-8"), mode="create")  # ifGenerationMatch=0
            except FileExistsError:  # 412: the precondition failed, someone else's object is there
                return False
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def stat(path: str | os.PathLike) -> tuple[float, str] | None:
    """(modification time, version token) of a file, or None when it is missing.

    The token changes whenever the file is replaced: the object generation on GCS, inode and
    nanosecond mtime locally. `remove_if_unchanged` takes it.
    """
    if is_remote(path):
        with _gcs(str(path)) as fs:
            try:
                info = fs.info(str(path))
            except FileNotFoundError:
                return None
        return info["mtime"].timestamp(), str(info["generation"])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime, f"{st.st_ino}:{st.st_mtime_ns}"


def remove_if_unchanged(path: str | os.PathLike, token: str) -> bool:
    """Delete a file only if it is still the version `token` names; True for exactly one contender."""
    if is_remote(path):
        bucket, key = split(str(path))
        with _gcs(str(path)) as fs:
            try:  # a generation-matched delete: a replaced (or already deleted) object is left alone
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=token)
            except (FileExistsError, FileNotFoundError):
                return False
        return True
    path = Path(path)
    taken = path.with_name(f".{path.name}.taken-{uuid.uuid4().hex[:8]}")
    try:  # only one contender's rename succeeds
        path.rename(taken)
    except FileNotFoundError:
        return False
    st = taken.stat()
    if f"{st.st_ino}:{st.st_mtime_ns}" != token:  # a newer file was renamed: put it back
        with contextlib.suppress(FileExistsError):
            os.link(taken, path)
        taken.unlink()
        return False
    taken.unlink()
    return True


def remove(path: str | os.PathLike) -> None:
    """Delete one file; nothing happens when it is missing."""
    if is_remote(path):
        with _gcs(str(path)) as fs, contextlib.suppress(FileNotFoundError):
            fs.rm_file(str(path))
        return
    Path(path).unlink(missing_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory (every object under a gs:// prefix) and everything in it."""
    if is_remote(path):
        with _gcs(str(path)) as fs:
            objects = fs.find(str(path).rstrip("/"))
            if objects:
                fs.rm(objects)
        return
    shutil.rmtree(path, ignore_errors=True)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern, in the pattern's own form (gs://… or local)."""
    if is_remote(pattern):
        with _gcs(pattern) as fs:
            return sorted(f"{SCHEME}{p}" for p in fs.glob(pattern))
    return sorted(_glob.glob(pattern))


def list_files(directory: str | os.PathLike) -> list[str]:
    """Every file under a directory, recursively, as '/'-separated names relative to it."""
    if is_remote(directory):
        prefix = str(directory).rstrip("/")
        bucket, key = split(prefix)
        base = f"{bucket}/{key}/"
        with _gcs(prefix) as fs:
            return sorted(p[len(base):] for p in fs.find(prefix) if p.startswith(base) and not p.endswith("/"))
    root = Path(directory)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- directories -------------------------------------------------------------------------------------


def upload_file(local: str | os.PathLike, remote: str) -> None:
    """Copy one local file to gs:// (atomic: the object appears only once complete)."""
    with _gcs(remote) as fs:
        fs.put_file(str(local), remote)


def _upload_files(fs: Any, pairs: list[tuple[str, str]]) -> None:
    if pairs:
        fs.put([local for local, _ in pairs], [remote for _, remote in pairs])


def add_files(local_dir: str | os.PathLike, remote_dir: str) -> None:
    """Upload every file of `local_dir` under the gs:// `remote_dir`, leaving the objects already there
    (event files and traces accumulate across attempts; each writer names its own files)."""
    remote_dir = remote_dir.rstrip("/")
    with _gcs(remote_dir) as fs:
        _upload_files(fs, [(str(Path(local_dir, n)), f"{remote_dir}/{n}") for n in list_files(local_dir)])


def upload_dir(local_dir: str | os.PathLike, remote_dir: str, last: str | None = "manifest.json") -> None:
    """Make `remote_dir` a copy of `local_dir`, with the file `last` (the completion marker) uploaded last.

    An earlier marker is deleted first, so while the copy is replaced it is not complete; objects under
    `remote_dir` that the local directory does not have (an interrupted earlier attempt's) are deleted
    before the marker goes up. A failure at any point leaves no marker.
    """
    remote_dir = remote_dir.rstrip("/")
    names = list_files(local_dir)
    marker = last if last in names else None
    with _gcs(remote_dir) as fs:
        if marker is not None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{remote_dir}/{marker}")
        _upload_files(fs, [(str(Path(local_dir, n)), f"{remote_dir}/{n}") for n in names if n != marker])
        stale = sorted(set(list_files(remote_dir)) - set(names))
        if stale:
            fs.rm([f"{remote_dir}/{n}" for n in stale])
        if marker is not None:
            fs.put_file(str(Path(local_dir, marker)), f"{remote_dir}/{marker}")


def download_dir(remote_dir: str, local_dir: str | os.PathLike, first: str | None = "manifest.json") -> Path:
    """Copy every object under `remote_dir` into `local_dir`, which appears complete or not at all.

    The files go to a temporary directory beside `local_dir` that is renamed into place at the end (an
    older copy there is replaced). `first` is fetched before the others: the caller checks it to know
    which version of the remote directory it got.
    """
    remote_dir = remote_dir.rstrip("/")
    dest = Path(local_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = list_files(remote_dir)
    if not names:
        raise FileNotFoundError(f"nothing under {remote_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        order = ([first] if first in names else []) + [n for n in names if n != first]
        for n in order:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
        with _gcs(remote_dir) as fs:
            if order[:1] == [first]:
                fs.get_file(f"{remote_dir}/{first}", str(tmp / first))
            rest = order[1:] if order[:1] == [first] else order
            if rest:
                fs.get([f"{remote_dir}/{n}" for n in rest], [str(tmp / n) for n in rest])
        install_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest



def install_dir(built: Path, dest: Path) -> None:
    """Move a complete local directory into place, replacing what is there (moved aside, then removed).
    When another process put its own complete copy there in the meantime, theirs is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        stale = dest.with_name(f".{dest.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            dest.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        built.rename(dest)
    except OSError:
        if not dest.exists():
            raise

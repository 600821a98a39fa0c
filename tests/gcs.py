"""A Google Cloud Storage emulator on loopback, for tests of `gs://` checkpoints.

The server is `gcp-storage-emulator` (PyPI, pure Python), run in a child process on 127.0.0.1 with
in-memory storage and one bucket. It speaks the GCS JSON API that gcsfs uses, but TensorStore (Orbax's
array storage) relies on four parts of that API the emulator leaves out, so `serve` fills them in
before starting it:

- reads answer with `x-goog-generation` / `x-goog-metageneration` headers: TensorStore takes an
  object's generation from them and rejects a read without one ("Malformed StorageGeneration");
- listing honours `startOffset` / `endOffset`: TensorStore lists a key range with them and does not
  filter the answer itself;
- writes and deletes honour `ifGenerationMatch` (412 when it does not hold): OCDBT creates and
  updates its manifest with it;
- `moveTo` (a move within a bucket): gcsfs tries it first when renaming.
- suffix ranges (`Range: bytes=-N`, the last N bytes): Riegeli (ArrayRecord's reader, which reads
  gs:// itself) fetches a file's footer with one; the emulator would answer with the whole object.

It also counts the object bytes it serves (`GET /_palm/served`, reset by `DELETE`), so a test can
measure what a reader fetched.

Run `python tests/gcs.py PORT BUCKET [--verbose]` to serve by hand (--verbose logs each request);
tests use `Emulator`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from http import HTTPStatus
from pathlib import Path

from palm.base.net import free_port


class Emulator:
    """The emulator in a child process; `host` is what STORAGE_EMULATOR_HOST should hold."""

    def __init__(self, bucket: str = "bucket", startup_timeout: float = 30.0):
        self.bucket = bucket
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        # Its output goes to a file: a pipe nobody reads would block it once full.
        self.log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(self.port), bucket],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                output = Path(self.log.name).read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the GCS emulator exited with {self.process.returncode}:\n{output}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the GCS emulator did not answer on {self.url} in {startup_timeout:.0f} s")
            time.sleep(0.1)

    def served(self, reset: bool = False) -> dict[str, int]:
        """{"bytes": object bytes served, "requests": object reads} since the start or the last reset."""
        req = urllib.request.Request(f"{self.url}/_palm/served", method="DELETE" if reset else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# -- the child process ----------------------------------------------------------------------------


def _precondition_failed(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                             "errors": [{"reason": "conditionNotMet", "domain": "global"}]}})


def _generation(storage, bucket: str, name: str) -> int:
    """The live generation of an object, 0 when there is none (as GCS preconditions count)."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _failed_precondition(request, storage, bucket: str, name: str, read: bool = False) -> HTTPStatus | None:
    """How GCS answers a request whose ifGenerationMatch / ifGenerationNotMatch does not hold, or None.

    A read whose ifGenerationNotMatch fails is "not modified"; every other failure is 412.
    """
    query = request.query
    if "ifGenerationMatch" not in query and "ifGenerationNotMatch" not in query:
        return None
    current = _generation(storage, bucket, name)
    if "ifGenerationMatch" in query and current != int(query["ifGenerationMatch"][0]):
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and current == int(query["ifGenerationNotMatch"][0]):
        return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None


def _refuse(response, status: HTTPStatus) -> None:
    if status == HTTPStatus.NOT_MODIFIED:
        response.status = status
    else:
        _precondition_failed(response)


_SERVED = {"bytes": 0, "requests": 0}


def _patched_handlers():
    """The emulator's routes with the handlers that need the additions above wrapped."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        failed = _failed_precondition(request, storage, bucket, name, read=True)
        if failed:
            return _refuse(response, failed)
        wanted = request.get_header("range", "")
        if wanted.strip().startswith("bytes=-"):
            size = int(storage.get_file_obj(bucket, name)["size"])
            headers = request._request_handler.headers
            headers.replace_header("range", f"bytes={max(0, size - int(wanted.split('-', 1)[1]))}-")
        objects.download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(bucket, name)
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
            response["x-goog-stored-content-length"] = str(obj["size"])
            _SERVED["bytes"] += len(response._content)
            _SERVED["requests"] += 1

    def served(request, response, storage, *args, **kwargs):
        response.json(dict(_SERVED))
        if request.method == "DELETE":
            _SERVED.update(bytes=0, requests=0)

    def get(request, response, storage, *args, **kwargs):
        if request.query.get("alt") == ["media"]:
            return download(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        failed = _failed_precondition(request, storage, bucket, name, read=True)
        if failed:
            return _refuse(response, failed)
        return objects.get(request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
        if name is not None and _failed_precondition(request, storage, request.params["bucket_name"], name):
            return _precondition_failed(response)
        return objects.insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        if _failed_precondition(request, storage, request.params["bucket_name"], request.params["object_id"]):
            return _precondition_failed(response)
        return objects.delete(request, response, storage, *args, **kwargs)

    def ls(request, response, storage, *args, **kwargs):
        objects.ls(request, response, storage, *args, **kwargs)
        start = request.query.get("startOffset", [""])[0]
        end = request.query.get("endOffset", [None])[0]
        if response.status != HTTPStatus.OK or not (start or end):
            return

        def within(name: str) -> bool:
            return start <= name and (end is None or name < end)

        listing = json.loads(response._content)  # the emulator's Response keeps its JSON body here
        listing["items"] = [o for o in listing.get("items") or [] if within(o["name"])]
        listing["prefixes"] = [p for p in listing.get("prefixes") or [] if within(p)]
        response.json(listing)

    def move(request, response, storage, *args, **kwargs):
        bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:
            storage.get_file_obj(bucket, src)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        request.params["dest_bucket_name"] = bucket
        objects.copy(request, response, storage, *args, **kwargs)
        if response.status == HTTPStatus.OK:
            storage.delete_file(bucket, src)

    wrapped = {objects.download: download, objects.get: get, objects.insert: insert, objects.delete: delete,
               objects.ls: ls}
    routes = [(pattern, {method: wrapped.get(handler, handler) for method, handler in methods.items()})
              for pattern, methods in server.HANDLERS]
    move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                  r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
    served_route = (r"^/_palm/served$", {"GET": served, "DELETE": served})
    return tuple([served_route, move_route, *routes])


def serve(port: int, bucket: str, verbose: bool = False) -> None:
    import logging

    from gcp_storage_emulator import server

    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format="%(relativeCreated)d %(name)s %(message)s")
    server.HANDLERS = _patched_handlers()
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], verbose="--verbose" in sys.argv[3:])

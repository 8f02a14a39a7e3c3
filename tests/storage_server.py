"""A local S3-compatible server for the object-storage tests: moto in server mode on 127.0.0.1.

Nothing leaves the machine: the server listens on the loopback address on a free port, and the
standard AWS variables point every client at it (``AWS_ENDPOINT_URL`` is read by botocore, so by
s3fs, boto3 and the Ray workers started after it is set). The credentials are moto's dummies.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from collections.abc import Iterator

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}
UNSET = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(bucket: str = "use-test") -> Iterator[str]:
    """Start moto on 127.0.0.1, point the AWS environment at it, create ``bucket``; yields ``s3://bucket``.

    The environment is restored afterwards and s3fs's cached file systems are dropped on both sides
    (an instance made for another endpoint would otherwise be reused)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets in process-wide state that outlives a server: start every server empty
    # (a second test module in the same pytest process would otherwise find the first one's bucket)
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"),
                           timeout=30).close()
    saved = {k: os.environ.get(k) for k in (*ENV, *UNSET, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    for k in UNSET:
        os.environ.pop(k, None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_dir(local: str | os.PathLike, url: str) -> None:
    """Copy a local directory tree under ``url`` (object keys = relative paths)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(local).rstrip("/") + "/", url.removeprefix("s3://").rstrip("/") + "/", recursive=True)

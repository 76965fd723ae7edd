"""A real S3 server for tests: moto's HTTP server on 127.0.0.1, one per test session.

Use from any test module (or once, in tests/conftest.py, for all of them):

    pytest_plugins = ["tests.s3server"]

    def test_something(s3_bucket):          # a fresh, empty bucket; AWS_* env points at it
        store = ArtifactStore(f"s3://{s3_bucket}/runs")

(Importing the fixtures by name works too, but ruff then reports each test argument that
uses one as a redefinition, F811.)

- `s3_server`: session-scoped endpoint URL (`http://127.0.0.1:PORT`).
- `s3_env`: sets fake credentials, a region and AWS_ENDPOINT_URL for one test (monkeypatch), and
  points the AWS config files elsewhere so a developer's own ~/.aws never leaks in.
- `s3_bucket`: a new bucket per test, created with boto3 (s3fs's mkdir is unreliable on moto).
- `s3_client`: a boto3 S3 client on the server, for inspecting or tampering with objects.
- `s3_enforce_auth`: `with s3_enforce_auth():` makes moto check credentials and IAM policies.
- `s3_server_client(endpoint, service)`: the same kind of client outside a fixture.
- `s3_requests`: the request lines the server answers during the test, as its access log
  writes them (`"GET /bucket/key HTTP/1.1" 200 -`), to count what a run downloads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

FAKE_ACCESS_KEY = "AKIATESTSDSSTORE0001"
FAKE_SECRET_KEY = "fake-secret-sds-0123456789abcdefghijklmn"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server in this process on a free port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_requests(s3_server: str) -> Iterator[list[str]]:
    """The access-log lines of the requests the moto server answers while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("werkzeug")  # moto's server writes its access log here
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> str:
    """Fake AWS credentials and the moto endpoint in the environment, for one test."""
    nowhere = tmp_path_factory.mktemp("aws") / "absent"
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s probe of 169.254.169.254
    return s3_server


def s3_server_client(endpoint: str, service: str = "s3"):
    """A boto3 client for `service` on the moto server at `endpoint`, with the fake credentials."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new, empty bucket on the moto server; its name."""
    name = f"sds-test-{uuid.uuid4().hex[:12]}"
    s3_server_client(s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_env: str):
    """A boto3 S3 client on the moto server."""
    return s3_server_client(s3_env)


@pytest.fixture
def s3_enforce_auth(s3_env: str):
    """`with s3_enforce_auth():` turns on moto's credential and IAM checks for the block."""
    return functools.partial(enforce_auth, s3_env)


@contextlib.contextmanager
def enforce_auth(endpoint: str) -> Iterator[None]:
    """Make moto authenticate requests and apply IAM policies until the block ends.

    Create the IAM users and keys you need before entering: once enforced, unknown access keys
    get InvalidAccessKeyId and users without a policy get AccessDenied.
    """

    def reset(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form body would be parsed away
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    reset("0")
    try:
        yield
    finally:
        reset("inf")

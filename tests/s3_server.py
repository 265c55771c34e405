"""A real S3-compatible HTTP server on loopback for tests: moto's server mode in a child process,
with request signing checked (moto's IAM authentication), so a wrong secret is refused as a real
store refuses it. The trainer's processes reach it over HTTP through the standard AWS variables.

    server = S3Server.start()
    monkeypatch.setattr(os, "environ", ...)  # or: for k, v in server.env().items(): monkeypatch.setenv(k, v)
    server.client().create_bucket(Bucket="corpus")
    ...
    server.stop()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

# moto answers this many requests without authentication: the three IAM calls that create the
# test user, its policy and its access key. Every later request must be signed with that key.
_UNAUTHENTICATED_SETUP_CALLS = 3
_ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, process: subprocess.Popen, endpoint: str, key_id: str, secret: str):
        self.process = process
        self.endpoint = endpoint
        self.key_id = key_id
        self.secret = secret

    @classmethod
    def start(cls, timeout: float = 30.0) -> S3Server:
        import boto3

        port = _free_port()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_UNAUTHENTICATED_SETUP_CALLS))
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="tester")
        iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName="tester")["AccessKey"]
        return cls(process, endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The AWS variables a process needs to use this server (``secret`` overrides the key's)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

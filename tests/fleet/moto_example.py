"""``examples/basic`` applied with the real AWS provider against a moto server, from a model
config rendered by ``spotguard fleet render``; shared by the single-node and multi-node tests."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3

from tests.fleet.built_wheel import with_wheel
from tests.fleet.conftest import Terraform, basic_example_on_moto

#: EC2 action -> what to cut from moto's answer to it (see :class:`AwsShapedEc2`).
AWS_SHAPE_FIXES = {
    "DescribeFleets": re.compile(rb"<instancePoolsToUseCount>[^<]*</instancePoolsToUseCount>"),
    "DescribeLaunchTemplateVersions": re.compile(
        rb"<item><resourceType>launch-template</resourceType><tagSet>.*?</tagSet></item>"
    ),
}


class AwsShapedEc2:
    """An HTTP proxy in front of moto that gives two EC2 answers the shape AWS gives them,
    so that a plan after the apply meets what it would meet on AWS:

    - DescribeFleets without ``instancePoolsToUseCount``: AWS omits it for
      price-capacity-optimized (provider issue 43176). moto omits it today too; stripping it
      keeps the test meaningful should moto start echoing it.
    - DescribeLaunchTemplateVersions without a ``launch-template`` entry among the launch
      template data's tag specifications: moto copies the template's own tags there, AWS
      does not.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rewritten: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = parse_qs(body.decode("latin-1")).get("Action", [""])[0]
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if action in AWS_SHAPE_FIXES:
                    data, count = AWS_SHAPE_FIXES[action].subn(b"", data)
                    proxy.rewritten[action] = proxy.rewritten.get(action, 0) + count
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args: object) -> None:
                pass

        return Handler


class _Planner:
    """``terraform plan`` of the applied working copy, as the drift check runs it, through
    :class:`AwsShapedEc2`."""

    def __init__(
        self,
        terraform: Terraform,
        work,
        env: dict[str, str],
        extra: list[str],
        proxy: AwsShapedEc2,
    ):
        self.terraform, self.work, self.extra, self.proxy = terraform, work, extra, proxy
        self.env = {**env, "AWS_ENDPOINT_URL": proxy.url}

    def __call__(self, *args: str, refresh: bool = True) -> subprocess.CompletedProcess[str]:
        refreshing = [] if refresh else ["-refresh=false"]
        return self.terraform(
            "plan",
            "-detailed-exitcode",
            *refreshing,
            *self.extra,
            *args,
            cwd=self.work,
            env=self.env,
            check=False,
        )


@dataclass
class Applied:
    """An applied working copy: its outputs, boto3 clients of the moto server, the subnets the
    config named, and a planner for plans after the apply."""

    work: Path
    outputs: dict[str, Any]
    client: Callable[[str], Any]
    subnets: list[str]
    plan: _Planner


def apply_basic_example(
    terraform: Terraform, destination: Path, moto_server: str, config: str, zones: list[str]
) -> Applied:
    """A VPC with one subnet per zone in moto, ``config`` formatted with ``vpc``, ``ami`` and
    ``subnet_a``, ``subnet_b``, ... rendered to ``fleet.auto.tfvars.json``, then applied."""
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=moto_server)  # type: ignore[call-overload]

    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{i}.0/24", AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for i, zone in enumerate(zones)
    ]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    work = basic_example_on_moto(destination)
    with_wheel(work)  # examples/basic installs the wheel `spotguard fleet package` builds
    names = {f"subnet_{letter}": subnet for letter, subnet in zip("abcdef", subnets)}
    (work / "model_config.yaml").write_text(config.format(vpc=vpc, ami=ami, **names))
    rendered = subprocess.run(
        [sys.executable, "-m", "spotguard", "fleet", "render", str(work / "model_config.yaml"),
         "--out", str(work / "fleet.auto.tfvars.json")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    extra = [
        "-var",
        "terminate_instances_on_delete=false",
        "-var",
        'allowed_account_ids=["123456789012"]',
    ]
    terraform("init", "-backend=false", cwd=work)
    terraform("apply", "-auto-approve", *extra, cwd=work, env=env)
    outputs = {
        name: value["value"]
        for name, value in json.loads(
            terraform("output", "-json", cwd=work, env=env).stdout
        ).items()
    }
    plan = _Planner(terraform, work, env, extra, AwsShapedEc2(moto_server))
    return Applied(work, outputs, client, subnets, plan)

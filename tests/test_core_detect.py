"""Cloud zone detection (protocols.md §6): environment first, then metadata services emulated on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

import carbonaware_core as core
from carbonaware_core import CloudZone, detect_cloud_zone
from tests.loopback import LoopbackServer, Reply, Seen, black_hole, refused_host, serving

LIMIT = 0.5  # the probes budget 0.3 s; CI noise gets the rest
# Tests about what is detected (not how fast) give the probes time to hear a loopback emulator on a loaded machine;
# the default budget is held by the timing tests below (detect_timed).
ANSWER_BUDGET = 2.0
TOKEN = "AQAEAFakeImdsV2Token-Q9x2w=="


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    """A link-local metadata address stand-in: every probe (AWS, GCP, Azure) goes to this one host."""
    with serving(poll_interval=0.02) as server:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", server.host)
        yield server


# --------------------------------------------------------------------------------------------------------------
# Emulators, answering as the real services do
# --------------------------------------------------------------------------------------------------------------


def aws_imds(server: LoopbackServer, *, region: str = "us-west-2", token_status: int = 200, require_v2: bool = True):
    """EC2 IMDS. ``require_v2``: token-less GETs get 401 (the default on new instances)."""

    def token(seen: Seen) -> Reply:
        if token_status != 200:
            return Reply(token_status, "", {"Content-Type": "text/html"})
        if "x-forwarded-for" in seen.headers:
            return Reply(403, "Forbidden", {"Content-Type": "text/plain"})
        ttl = seen.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return Reply(400, "Missing or Invalid Parameters", {"Content-Type": "text/plain"})
        return Reply(200, TOKEN, {"Content-Type": "text/plain", "X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})

    def meta(value: str):
        def answer(seen: Seen) -> Reply:
            given = seen.headers.get("x-aws-ec2-metadata-token")
            if (given is None and require_v2) or (given is not None and given != TOKEN):
                return Reply(401, "", {"Content-Type": "text/plain"})
            return Reply(200, value, {"Content-Type": "text/plain"})

        return answer

    server.route("PUT", "/latest/api/token", token)
    server.route("GET", "/latest/meta-data/placement/region", meta(region))
    server.route("GET", "/latest/meta-data/placement/availability-zone", meta(region + "a"))


GCP_HEADERS = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}


def gcp_metadata(server: LoopbackServer, *, zone: str | None, region: str | None, flavor_header: bool = True):
    """GCE / Cloud Run metadata server: needs ``Metadata-Flavor: Google`` and says so in every answer."""
    headers = GCP_HEADERS if flavor_header else {"Content-Type": "application/text"}

    def route(value: str | None):
        def answer(seen: Seen) -> Reply:
            if seen.headers.get("metadata-flavor") != "Google":
                return Reply(403, "Missing required header: Metadata-Flavor", headers)
            if value is None:
                return Reply(404, "Not Found", headers)
            return Reply(200, value, headers)

        return answer

    server.route("GET", "/computeMetadata/v1/instance/zone", route(zone))
    server.route("GET", "/computeMetadata/v1/instance/region", route(region))


def azure_imds(server: LoopbackServer, *, location: str = "westeurope") -> None:
    def answer(seen: Seen) -> Reply:
        query = parse_qs(urlsplit(seen.path).query)
        if seen.headers.get("metadata") != "true" or "x-forwarded-for" in seen.headers:
            return Reply(400, {"error": "Bad request. Required metadata header not specified"})
        if "api-version" not in query:
            return Reply(400, {"error": "Bad request. api-version was not specified"})
        if query.get("format") != ["text"]:
            return Reply(200, json.dumps(location))  # a JSON string, quotes included
        return Reply(200, location, {"Content-Type": "text/plain; charset=utf-8"})

    server.route("GET", "/metadata/instance/compute/location", answer)


def detect_timed(timeout: float | None = None) -> tuple[CloudZone | None, float]:
    began = time.monotonic()
    zone = detect_cloud_zone() if timeout is None else detect_cloud_zone(timeout=timeout)
    return zone, time.monotonic() - began


# --------------------------------------------------------------------------------------------------------------
# Environment first: no network at all
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CARBONAWARE_PROVIDER": "gcp", "CARBONAWARE_REGION": "europe-west4"}, CloudZone("gcp", "europe-west4")),
        ({"CARBONAWARE_PROVIDER": "AZURE", "CARBONAWARE_REGION": "West Europe"}, CloudZone("azure", "westeurope")),
        ({"AWS_REGION": "eu-central-1"}, CloudZone("aws", "eu-central-1")),
        ({"AWS_DEFAULT_REGION": "ap-southeast-2"}, CloudZone("aws", "ap-southeast-2")),
        ({"AWS_REGION": "us-gov-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}, CloudZone("aws", "us-gov-west-1")),
        ({"REGION_NAME": "East US 2"}, CloudZone("azure", "eastus2")),
        ({"REGION_NAME": "eastus2"}, CloudZone("azure", "eastus2")),
        (
            {"CARBONAWARE_PROVIDER": "gcp", "CARBONAWARE_REGION": "us-east1", "AWS_REGION": "eu-west-1"},
            CloudZone("gcp", "us-east1"),
        ),
    ],
)
def test_environment_wins_without_a_request(
    env: dict[str, str], expected: CloudZone, metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_imds(metadata, region="sa-east-1")  # something that would answer differently
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    zone, elapsed = detect_timed()
    assert zone == expected
    assert metadata.seen == []
    assert elapsed < 0.1


def test_a_malformed_aws_region_variable_is_not_trusted(metadata: LoopbackServer, monkeypatch) -> None:
    monkeypatch.setenv("AWS_REGION", "local")  # e.g. localstack: not a region; ask the metadata service instead
    aws_imds(metadata, region="us-east-2")
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "us-east-2")


@pytest.mark.parametrize("variable", ["CARBONAWARE_PROVIDER", "CARBONAWARE_REGION"])
def test_half_of_the_zone_in_the_environment_is_not_a_zone_and_says_so(
    variable: str, metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(variable, "aws" if variable == "CARBONAWARE_PROVIDER" else "eu-central-1")
    aws_imds(metadata, region="ca-central-1")
    with caplog.at_level("WARNING", logger="carbonaware"):
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "ca-central-1")
    missing = "CARBONAWARE_REGION" if variable == "CARBONAWARE_PROVIDER" else "CARBONAWARE_PROVIDER"
    assert any(f"{missing} is not set" in r.getMessage() for r in caplog.records)


def test_an_unknown_provider_in_the_environment_is_ignored_with_a_warning(
    metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CARBONAWARE_PROVIDER", "amazon")
    monkeypatch.setenv("CARBONAWARE_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    with caplog.at_level("WARNING", logger="carbonaware"):
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "eu-west-1")
    assert any("CARBONAWARE_PROVIDER" in r.getMessage() and "amazon" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# Metadata services
# --------------------------------------------------------------------------------------------------------------


def test_ecs_task_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as ecs:
        task = {
            "Cluster": "arn:aws:ecs:eu-west-1:111122223333:cluster/default",
            "TaskARN": "arn:aws:ecs:eu-west-1:111122223333:task/default/158d1c8083dd49d6b527399fd6414f5c",
            "Family": "curltest",
            "AvailabilityZone": "eu-west-1b",
            "LaunchType": "FARGATE",
        }
        ecs.route("GET", "/v4/a8585b7c-0e7d-4a1c-9d1f/task", Reply(200, task))
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"{ecs.url}/v4/a8585b7c-0e7d-4a1c-9d1f")
        zone, elapsed = detect_timed()
        assert zone == CloudZone("aws", "eu-west-1")
        assert [s.path for s in ecs.seen] == ["/v4/a8585b7c-0e7d-4a1c-9d1f/task"]
    assert elapsed < LIMIT


def test_ecs_answer_of_the_wrong_shape_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as ecs:
        ecs.route("GET", "/v4/x/task", Reply(200, {"TaskARN": "not-an-arn"}))
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"{ecs.url}/v4/x")
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) is None


def test_aws_imdsv2(metadata: LoopbackServer) -> None:
    aws_imds(metadata, region="us-west-2", require_v2=True)
    zone, elapsed = detect_timed()
    assert zone == CloudZone("aws", "us-west-2")
    [put] = metadata.requests_to("/latest/api/token")
    assert put.method == "PUT"
    assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert "x-forwarded-for" not in put.headers
    gets = metadata.requests_to("/latest/meta-data/placement/region")
    assert gets and all(g.headers.get("x-aws-ec2-metadata-token") == TOKEN for g in gets)
    assert elapsed < LIMIT


def test_metadata_host_may_be_given_as_a_url(metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_METADATA_HOST", metadata.url + "/")
    aws_imds(metadata, region="af-south-1")
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "af-south-1")


def test_aws_sdk_endpoint_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS SDKs' own variable for the IMDS address is honoured (the generic host stays refused)."""
    with serving(poll_interval=0.02) as imds:
        aws_imds(imds, region="me-central-1")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "me-central-1")
        assert imds.requests_to("/latest/api/token")


@pytest.mark.parametrize("status", [403, 404, 405])
def test_aws_imdsv1_fallback_when_the_token_is_refused(metadata: LoopbackServer, status: int) -> None:
    aws_imds(metadata, region="eu-north-1", token_status=status, require_v2=False)
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "eu-north-1")
    [get] = metadata.requests_to("/latest/meta-data/placement/region")
    assert "x-aws-ec2-metadata-token" not in get.headers


def test_aws_instance_requiring_v2_without_a_token_is_not_detected(metadata: LoopbackServer) -> None:
    """The emulator really refuses token-less reads: the v2 test above passes only because a token was used."""
    aws_imds(metadata, region="eu-north-1", token_status=404, require_v2=True)
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) is None
    [get] = metadata.requests_to("/latest/meta-data/placement/region")
    assert "x-aws-ec2-metadata-token" not in get.headers


def test_aws_local_zone_region_is_not_chopped_from_the_az(metadata: LoopbackServer) -> None:
    aws_imds(metadata, region="us-west-2")
    metadata.route("GET", "/latest/meta-data/placement/availability-zone", Reply(200, "us-west-2-lax-1a"))
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "us-west-2")


def test_aws_metadata_disabled(metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    aws_imds(metadata, region="us-west-2")
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) is None
    assert metadata.requests_to("/latest/api/token") == []
    assert metadata.requests_to("/latest/meta-data/placement/region") == []


@pytest.mark.parametrize(
    ("zone", "region", "expected"),
    [
        ("projects/123456789/zones/us-central1-a", None, "us-central1"),  # a VM
        ("projects/123456789/zones/europe-west4-c", "projects/123456789/regions/europe-west4", "europe-west4"),
        (None, "projects/123456789/regions/asia-northeast1", "asia-northeast1"),  # Cloud Run / Functions
    ],
)
def test_gcp(metadata: LoopbackServer, zone: str | None, region: str | None, expected: str) -> None:
    gcp_metadata(metadata, zone=zone, region=region)
    found, elapsed = detect_timed()
    assert found == CloudZone("gcp", expected)
    asked = [s for s in metadata.seen if s.path.startswith("/computeMetadata/")]
    assert asked and all(s.headers.get("metadata-flavor") == "Google" for s in asked)
    assert elapsed < LIMIT


def test_gcp_host_override(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as gce:
        gcp_metadata(gce, zone="projects/42/zones/southamerica-east1-b", region=None)
        monkeypatch.setenv("GCE_METADATA_HOST", gce.host)  # CARBONAWARE_METADATA_HOST stays refused
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("gcp", "southamerica-east1")


def test_gcp_looking_answer_without_the_flavor_header_is_rejected(metadata: LoopbackServer) -> None:
    gcp_metadata(
        metadata, zone="projects/1/zones/us-central1-a", region="projects/1/regions/us-central1", flavor_header=False
    )
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) is None


def test_azure(metadata: LoopbackServer) -> None:
    azure_imds(metadata, location="westeurope")
    zone, elapsed = detect_timed()
    assert zone == CloudZone("azure", "westeurope")
    [seen] = metadata.requests_to("/metadata/instance/compute/location")
    query = parse_qs(urlsplit(seen.path).query)
    assert seen.headers.get("metadata") == "true"
    assert query["format"] == ["text"] and query["api-version"]
    assert "x-forwarded-for" not in seen.headers
    assert elapsed < LIMIT


def test_captive_portal_answering_html_everywhere_is_no_zone(metadata: LoopbackServer) -> None:
    portal = Reply(200, "<html><body>Sign in to the hotel Wi-Fi</body></html>", {"Content-Type": "text/html"})
    for method, path in [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/placement/region"),
        ("GET", "/computeMetadata/v1/instance/zone"),
        ("GET", "/computeMetadata/v1/instance/region"),
        ("GET", "/metadata/instance/compute/location"),
    ]:
        metadata.route(method, path, portal)
    assert detect_cloud_zone(timeout=ANSWER_BUDGET) is None


def test_probes_ignore_proxies(metadata: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Link-local addresses must never go through a proxy (it would answer for its own host, or hang)."""
    aws_imds(metadata, region="eu-west-3")
    with serving(poll_interval=0.02) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert detect_cloud_zone(timeout=ANSWER_BUDGET) == CloudZone("aws", "eu-west-3")
        assert proxy.seen == []


# --------------------------------------------------------------------------------------------------------------
# Nothing answering, slow answers, caching
# --------------------------------------------------------------------------------------------------------------


def test_nothing_listening_returns_none_at_once() -> None:
    zone, elapsed = detect_timed()  # the conftest points the metadata host at a refused port
    assert zone is None
    assert elapsed < LIMIT


def test_black_holed_metadata_returns_none_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    with black_hole() as host, black_hole() as gce:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", host)
        monkeypatch.setenv("GCE_METADATA_HOST", gce)
        zone, elapsed = detect_timed()
    assert zone is None
    assert elapsed <= LIMIT
    assert core.DETECT_TIMEOUT_SECONDS <= 0.3


def test_black_holed_ecs_endpoint_does_not_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    with black_hole() as ecs:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"http://{ecs}/v4/abc")
        zone, elapsed = detect_timed()
    assert zone is None
    assert elapsed <= LIMIT


def test_slow_metadata_answer_is_not_waited_for(metadata: LoopbackServer) -> None:
    metadata.route("PUT", "/latest/api/token", Reply(200, TOKEN, {"Content-Type": "text/plain"}, delay=1.5))
    metadata.route("GET", "/latest/meta-data/placement/region", Reply(200, "us-west-2", delay=1.5))
    zone, elapsed = detect_timed()
    assert zone is None
    assert elapsed <= LIMIT


def test_caller_timeout_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with black_hole() as host:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", host)
        zone, elapsed = detect_timed(timeout=0.1)
    assert zone is None
    assert elapsed <= 0.1 + 0.2


def test_a_fast_answer_does_not_wait_for_black_holed_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as gce, black_hole() as host:
        gcp_metadata(gce, zone="projects/7/zones/europe-west2-b", region=None)
        monkeypatch.setenv("GCE_METADATA_HOST", gce.host)
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", host)  # AWS and Azure probes hang here
        zone, elapsed = detect_timed(timeout=2.0)
    assert zone == CloudZone("gcp", "europe-west2")
    assert elapsed < 1.0


def test_result_is_cached(metadata: LoopbackServer) -> None:
    aws_imds(metadata, region="ap-south-1")
    assert detect_cloud_zone() == CloudZone("aws", "ap-south-1")
    requests_made = len(metadata.seen)
    assert requests_made >= 2
    zone, elapsed = detect_timed()
    assert zone == CloudZone("aws", "ap-south-1")
    assert len(metadata.seen) == requests_made  # no new request
    assert elapsed < 0.05


def test_nothing_found_is_cached_too(monkeypatch: pytest.MonkeyPatch) -> None:
    with black_hole() as host:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", host)
        assert detect_timed()[0] is None
        zone, elapsed = detect_timed()
    assert zone is None
    assert elapsed < 0.05  # the second call does not probe again


def test_plan_uses_the_detected_zone(metadata: LoopbackServer) -> None:
    from datetime import datetime, timedelta, timezone

    azure_imds(metadata, location="northeurope")
    seen: list[object] = []

    def series(zone, start, end):
        seen.append(zone)
        return [core.ForecastPoint(start, end, 100.0)]

    now = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)
    plan = core.plan_delay(timedelta(hours=1), timedelta(minutes=30), source=series, now=now)
    assert plan.zone == CloudZone("azure", "northeurope")
    assert seen == [CloudZone("azure", "northeurope")]


def test_refused_host_helper_is_refused() -> None:
    """Guard the fixture: the default metadata host really has nothing listening."""
    import socket

    host, port = refused_host().split(":")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), timeout=1):
        pass

"""The Kubernetes manifest (deploy/kubernetes.yaml): valid for the API server, and run.

kubernetes-validate checks every document against the Kubernetes API's own JSON schemas, which
it ships (no network). ``podman kube play`` then runs the Deployment's pod from the image that
tests/test_container.py builds, as a kubelet would run it: on podman's bridge, the pod serves
on its own address, port 1982; its probes' commands pass inside the container; and stopping it
as the kubelet does (the preStop hook, then SIGTERM, the pod's network kept until the
container exits) answers a request in flight whole. podman runs one pod of the Deployment.

As in tests/test_container.py, podman runs under deploy/containers.conf, and nothing is
skipped: where podman cannot run a pod, the tests fail and say why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from client import HEADER, recv_frame
from tests.harness import ROOT, wait_until
from tests.test_container import (
    BUILD_TIMEOUT_S,
    REPLY,
    REQUEST,
    SERVER_PORT,
    STOP_TIMEOUT_S,
    build_image,
    podman,
    podman_result,
    stop_answering_the_request_in_flight,
)
from tools.drill import free_port

MANIFEST = ROOT / "deploy" / "kubernetes.yaml"
LONGEST_DOCUMENTED_REQUEST_S = 300  # OPERATIONS.md: 5 minutes, as the systemd unit's stop

pytestmark = pytest.mark.slow


def documents() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]


def kind(name: str) -> dict[str, Any]:
    return next(document for document in documents() if document["kind"] == name)


def container_spec() -> dict[str, Any]:
    spec: dict[str, Any] = kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    return spec


@pytest.mark.parametrize("document", documents(), ids=lambda document: document["kind"])
def test_manifest_passes_the_kubernetes_schemas(document: dict[str, Any]) -> None:
    # strict: a field the schema does not know (a typo) is an error too.
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(document, version, strict=True)


def test_a_pod_is_given_longer_to_drain_than_the_longest_documented_request() -> None:
    grace_s = kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > LONGEST_DOCUMENTED_REQUEST_S


def test_the_service_sends_to_the_port_the_pod_serves() -> None:
    (port,) = kind("Service")["spec"]["ports"]
    (container_port,) = container_spec()["ports"]
    assert (port["port"], port["targetPort"]) == (SERVER_PORT, container_port["name"])
    assert container_port["containerPort"] == SERVER_PORT


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built from the checkout (as tests/test_container.py builds it); its tag."""
    tag = f"localhost/bluserver:kube-{os.getpid()}"
    build_image(tag)
    yield tag
    podman("rmi", tag)


class Pod:
    """The manifest run by podman kube play: its Deployment's image replaced by image, one
    replica, and its port published on 127.0.0.1 only, at a free port (podman 4 publishes a
    containerPort on the host's every address, at its own number, where a kubelet does not)."""

    def __init__(self, image: str, work_dir: Path) -> None:
        manifest = documents()  # podman plays the Deployment, and ignores the other kinds
        deployment = next(document for document in manifest if document["kind"] == "Deployment")
        deployment["metadata"]["name"] = f"bluserver-test-{os.getpid()}"
        deployment["spec"]["replicas"] = 1
        spec = container_spec_of(deployment)
        spec["image"] = image
        spec["ports"][0].update(hostIP="127.0.0.1", hostPort=free_port())
        self.spec = spec
        self.manifest = work_dir / "deployment.yaml"
        self.manifest.write_text(yaml.safe_dump_all(manifest))
        played = podman("kube", "play", str(self.manifest), timeout_s=BUILD_TIMEOUT_S)
        pod_id = played.split("Pod:\n")[1].split()[0]
        # The pod's containers: its infra container (which holds its network), and ours.
        self.container = podman(
            "ps",
            "--filter",
            f"pod={pod_id}",
            "--format",
            "{{.Names}}",
            "--filter",
            "ancestor=" + image,
        )
        # The pod's address on podman's bridge (the network its infra container holds).
        address = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        self.address = podman("container", "inspect", "--format", address, self.container)

    def exec(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return podman_result("exec", self.container, *command)

    def state(self) -> dict[str, Any]:
        inspected: list[dict[str, Any]] = json.loads(
            podman("container", "inspect", self.container)
        )
        return dict(inspected[0]["State"])

    def logs(self) -> str:
        return podman("logs", self.container)

    def cleanup(self) -> None:
        podman("kube", "down", str(self.manifest))


def container_spec_of(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return spec


@pytest.fixture(scope="module")
def pod(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    played = Pod(image, tmp_path_factory.mktemp("kube"))
    yield played
    played.cleanup()


def serves(address: str) -> bool:
    """Whether address:1982 answers an empty request with the empty reply."""
    try:
        with socket.create_connection((address, SERVER_PORT), timeout=1) as sock:
            sock.sendall(HEADER.pack(0))
            return recv_frame(sock) == b""
    except OSError:
        return False


def test_the_pod_serves_on_its_address(pod: Pod) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", pod.address), pod.address
    wait_until(lambda: serves(pod.address), "the pod to serve")
    with socket.create_connection((pod.address, SERVER_PORT), timeout=10) as sock:
        sock.sendall(HEADER.pack(len(REQUEST)) + REQUEST)
        assert recv_frame(sock) == REPLY


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_the_probe_commands_pass_inside_the_pod(pod: Pod, probe: str) -> None:
    wait_until(lambda: serves(pod.address), "the pod to serve")
    result = pod.exec(pod.spec[probe]["exec"]["command"])
    assert result.returncode == 0, result.stderr


def test_stopping_the_pod_as_the_kubelet_does_answers_a_request_in_flight(pod: Pod) -> None:
    # Last in this module: it stops the pod. The kubelet runs the preStop hook, then sends
    # SIGTERM, and SIGKILL after the grace period; the pod's network stays until then.
    # `podman stop` does the last two (STOPSIGNAL, then SIGKILL after -t), leaving the pod's
    # infra container, and its network, up; podman kill would have the pod restart it.
    grace_s = kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    wait_until(lambda: serves(pod.address), "the pod to serve")
    with socket.create_connection((pod.address, SERVER_PORT), timeout=STOP_TIMEOUT_S) as sock:
        sock.sendall(HEADER.pack(len(REQUEST)) + REQUEST[:1])  # a handler holds it
        assert pod.exec(pod.spec["lifecycle"]["preStop"]["exec"]["command"]).returncode == 0
        status, errors = stop_answering_the_request_in_flight(
            sock, pod.container, grace_s, pod.logs
        )
    state = pod.state()
    assert (status, state["Status"], state["ExitCode"]) == (0, "exited", 0), errors

"""The operator's OCI image (``make image``) runs the operator (issue 17).

Covers:
- the archive is an oci-archive that skopeo reads, under the name the chart deploys, and its
  config (entrypoint, user, working directory, ports, environment, labels) is what
  ``image/image.toml`` says;
- unpacked with umoci, ``tokenbudget --version`` runs from its root filesystem as the
  image's non-root user and prints the package version;
- ``tokenbudget run`` from that root filesystem (chroot, as the image's user, with only the
  image's environment), against the test control plane and Prometheus, evaluates a
  TokenBudget and writes its status.

Prints the archive's size and the unpacked root filesystem's size. Cold, the ``oci_image``
fixture builds the image (mmdebstrap and pip, ~2 min on 2 cores); warm it is cached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import image
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget import __version__
from token_budget.kube import TOKENBUDGETS, Kube


@pytest.fixture(scope="module")
def bundle(oci_image: Path, tmp_path_factory: pytest.TempPathFactory) -> image.Bundle:
    """The image unpacked once for this module (umoci unpack: ~15 s)."""
    spec = image.builder().load_spec()
    return image.unpack(oci_image, tmp_path_factory.mktemp("image"), spec.version)


def test_the_archive_is_the_image_that_image_toml_describes(oci_image: Path,
                                                           skopeo: Path) -> None:
    spec = image.builder().load_spec()
    ref = f"oci-archive:{oci_image}:{spec.version}"
    inspect = subprocess.run([str(skopeo), "inspect", "--config", ref], capture_output=True,
                             text=True, check=True)
    config = json.loads(inspect.stdout)["config"]
    assert config["Entrypoint"] == spec.entrypoint
    assert config["User"] == spec.user
    assert config["WorkingDir"] == spec.workdir
    assert sorted(config["ExposedPorts"]) == [f"{p}/tcp" for p in spec.exposed_ports]
    assert config["Env"] == [f"{k}={v}" for k, v in spec.env.items()]
    assert config["Labels"] == spec.all_labels
    assert config["Labels"]["org.opencontainers.image.version"] == __version__
    with tarfile.open(oci_image) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    [manifest] = index["manifests"]
    assert manifest["annotations"]["io.containerd.image.name"] == spec.name, \
        "containerd (kind load image-archive) names the image from this annotation"
    size = oci_image.stat().st_size
    print(f"\nimage {spec.name}: archive {size / 1e6:.1f} MB")


def test_skopeo_copies_the_archive_into_a_registry_as_the_readme_says(
        oci_image: Path, skopeo: Path, registry: image.Registry) -> None:
    spec = image.builder().load_spec()
    dest = f"docker://{registry.host}/token-budget-operator:{spec.version}"
    subprocess.run([str(skopeo), "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci-archive:{oci_image}", dest], check=True, timeout=120)
    pushed = subprocess.run([str(skopeo), "inspect", "--tls-verify=false", dest],
                            capture_output=True, text=True, check=True)
    local = subprocess.run([str(skopeo), "inspect", f"oci-archive:{oci_image}"],
                           capture_output=True, text=True, check=True)
    assert json.loads(pushed.stdout)["Layers"] == json.loads(local.stdout)["Layers"]
    assert json.loads(pushed.stdout)["Labels"] == spec.all_labels


def test_the_unpacked_image_prints_its_version_as_the_non_root_user(
        bundle: image.Bundle) -> None:
    assert bundle.config["process"]["user"] == {"uid": 65532, "gid": 65532}
    out = subprocess.run(bundle.argv([bundle.config["process"]["args"][0], "--version"]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tokenbudget {__version__}"
    du = subprocess.run(["du", "-sm", str(bundle.rootfs)], capture_output=True, text=True)
    print(f"\nunpacked root filesystem: {du.stdout.split()[0]} MB")


@pytest.fixture
def image_operator(bundle: image.Bundle, controlplane: ControlPlane, prometheus: Prometheus,
                   tmp_path: Path) -> Iterator[OperatorProcess]:
    """``tokenbudget run`` from the image's root filesystem, as its entrypoint says."""
    inside = Path(bundle.config["process"]["cwd"]) / "kubeconfig"
    target = bundle.rootfs / inside.relative_to("/")
    shutil.copyfile(controlplane.kubeconfig, target)
    target.chmod(0o644)  # read by the image's non-root user
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                         identity="image", extra_args=["--lease-name", "tb-image"],
                         command=bundle.argv(env={"KUBECONFIG": str(inside)}))
    op.start()
    try:
        yield op
    finally:
        op.stop()
        target.unlink(missing_ok=True)


def test_the_operator_from_the_image_evaluates_a_budget_and_writes_its_status(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        image_operator: OperatorProcess) -> None:
    ns = namespace
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 600_000)
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                 "actions": [{"type": "Warn", "atPercent": 50}]},
    })

    def warned() -> bool:
        status = kube.get(TOKENBUDGETS, ns, "team").get("status") or {}
        return status.get("state") == "Warning"

    try:
        eventually(warned, 60, what=f"TokenBudget {ns}/team state Warning")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{image_operator.tail(30)}") from None
    assert image_operator.running()

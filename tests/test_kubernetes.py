"""The Kubernetes manifests (conf/kubernetes/): valid for Kubernetes 1.33 (kubernetes-validate, strict), and the
security properties README's "Kubernetes" section promises, read from the YAML itself; their configuration loads, and
asks of the proxy exactly the capabilities the sidecar is given."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tproxy.config import Config
from tproxy.privileges import CAP_NET_RAW, cap_name, required_capabilities

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "conf" / "kubernetes"
SIDECAR = MANIFESTS / "pod-sidecar.yaml"
ZERO = MANIFESTS / "pod-zero-capability.yaml"
K8S_VERSION = "1.33.0"
ADMIN_PORT = 4191


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


class Pod:
    """The pod template of the manifest's Deployment, with its ConfigMaps resolved as a kubelet resolves envFrom."""

    def __init__(self, path: Path) -> None:
        docs = documents(path)
        self.config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        self.spec = deployment["spec"]["template"]["spec"]
        self.init = {c["name"]: c for c in self.spec["initContainers"]}
        self.rules = self.init["tproxy-rules"]
        self.proxy = self.init["tproxy"]

    def env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.config_maps[source["configMapRef"]["name"]])
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        return env

    def config(self, container: dict) -> Config:
        return Config.load(None, self.env(container))

    def seccomp(self, container: dict) -> str | None:
        sc = container.get("securityContext", {}).get("seccompProfile") or self.spec.get("securityContext", {}).get(
            "seccompProfile", {}
        )
        return sc.get("type")


@pytest.fixture(params=[SIDECAR, ZERO], ids=lambda p: p.stem)
def manifest(request) -> Path:
    return request.param


# -- validation against the API's own schemas


def test_valid_for_kubernetes_1_33_strict(manifest):
    for doc in documents(manifest):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_an_unknown_field(manifest):
    """The control: a misspelt field (restartPolicy on a container, in the wrong case) must fail."""
    (deployment,) = [copy.deepcopy(d) for d in documents(manifest) if d["kind"] == "Deployment"]
    sidecar = [c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "tproxy"][0]
    sidecar["restartpolicy"] = sidecar.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# -- both variants


def test_the_rules_init_container(manifest):
    pod = Pod(manifest)
    c = pod.rules
    assert list(pod.init) == ["tproxy-rules", "tproxy"]  # rules first, then the sidecar starts
    assert "restartPolicy" not in c  # an ordinary init container: it runs to completion
    assert "command" not in c and c["args"] == ["rules", "apply"]  # the image's entrypoint is tproxy
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod.seccomp(c) == "RuntimeDefault"
    assert {m["mountPath"] for m in c.get("volumeMounts", [])} == {"/run"}  # state and locks on a read-only root


def test_the_native_sidecar(manifest):
    pod = Pod(manifest)
    c = pod.proxy
    assert c["restartPolicy"] == "Always"
    assert "command" not in c and c["args"] == ["run", "--no-rules"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0 and isinstance(sc["runAsGroup"], int)
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod.seccomp(c) == "RuntimeDefault"
    assert c["image"] == pod.rules["image"]
    assert pod.spec["enableServiceLinks"] is False


def test_probes_on_the_admin_port_which_is_never_intercepted(manifest):
    pod = Pod(manifest)
    c = pod.proxy
    (port,) = c["ports"]
    assert port["containerPort"] == ADMIN_PORT and port["name"]
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe
    config = pod.config(c)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", ADMIN_PORT)  # the kubelet probes the pod's IP
    assert ADMIN_PORT in config.intercept.exclude_ports[0] and not config.intercept.intercepts(ADMIN_PORT)


def test_both_containers_read_one_configuration(manifest):
    pod = Pod(manifest)
    assert pod.env(pod.rules) == pod.env(pod.proxy)
    config = pod.config(pod.proxy)
    assert config.proxy.upstream == "original"  # "loopback" needs route_localnet; /proc/sys is read-only
    assert set(config.from_environment().values()) == set(pod.env(pod.proxy))


def test_the_image_user_is_the_sidecars(manifest):
    (user,) = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "conf" / "Containerfile").read_text(), re.M)
    sc = Pod(manifest).proxy["securityContext"]
    assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user


# -- per variant: the capabilities given are the ones the configuration needs


def test_sidecar_variant_adds_only_net_raw_which_its_config_needs():
    pod = Pod(SIDECAR)
    assert pod.proxy["securityContext"]["capabilities"]["add"] == ["NET_RAW"]
    config = pod.config(pod.proxy)
    assert config.mode == "tproxy" and config.preserve_source
    need = required_capabilities(config, binds_listener=True, port_start=1024)
    assert [cap_name(c) for c in need] == ["CAP_NET_RAW"] and CAP_NET_RAW in need


def test_zero_capability_variant_needs_and_gets_none():
    pod = Pod(ZERO)
    assert "add" not in pod.proxy["securityContext"]["capabilities"]
    config = pod.config(pod.proxy)
    assert (config.mode, config.preserve_source, config.proxy.send_proxy_protocol) == ("nat", False, "v2")
    assert required_capabilities(config, binds_listener=True, port_start=1024) == {}


def restricted_violations(pod: Pod, c: dict) -> list[str]:
    """What in container ``c`` breaks Pod Security "restricted" (kubernetes.io/docs/concepts/security/
    pod-security-standards), for the container's own fields and the pod's that apply to it."""
    sc = c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    out = []
    if sc.get("privileged"):
        out.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation")
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
        out.append("runAsNonRoot")
    if "ALL" not in caps.get("drop", []):
        out.append("capabilities.drop")
    out += [f"capabilities.add {cap}" for cap in caps.get("add", []) if cap != "NET_BIND_SERVICE"]
    if pod.seccomp(c) not in ("RuntimeDefault", "Localhost"):
        out.append("seccompProfile")
    if any(p.get("hostPort") for p in c.get("ports", [])):
        out.append("hostPort")
    if any("hostPath" in v for v in pod.spec.get("volumes", [])):
        out.append("hostPath")
    out += [k for k in ("hostNetwork", "hostPID", "hostIPC") if pod.spec.get(k)]
    return out


def test_pod_security_level_of_each_container():
    """The zero-capability sidecar meets "restricted"; NET_RAW or NET_ADMIN is "privileged" (not even "baseline"
    allows adding them), which is what each file's header says the namespace needs."""
    zero, sidecar = Pod(ZERO), Pod(SIDECAR)
    assert restricted_violations(zero, zero.proxy) == []
    assert restricted_violations(sidecar, sidecar.proxy) == ["capabilities.add NET_RAW"]
    for pod in (zero, sidecar):
        assert restricted_violations(pod, pod.rules) == [
            "runAsNonRoot",
            "capabilities.add NET_ADMIN",
            "capabilities.add NET_RAW",
        ]
    for path in (ZERO, SIDECAR):
        assert re.search(r'Pod Security\s+(#\s+)?"privileged"', path.read_text()), path
    for pod in (zero, sidecar):  # the application containers are restricted too
        for c in pod.spec["containers"]:
            assert restricted_violations(pod, c) == [], c["name"]

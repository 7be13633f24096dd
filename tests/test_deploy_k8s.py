"""deploy/k8s validated offline: every object against Kubernetes' own JSON schemas (kubernetes-validate, which
ships them) or, for the CRDs (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
PodMonitor), against the minimal schemas vendored in tests/k8s_schemas; then what the system needs of them
(probes on the metrics port, one Recreate Deployment per camera, GPU workers with requests, Redis with AOF
and the ACL roles, KEDA on every camera's stream)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from contracts.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).with_name("k8s_schemas")
KUBERNETES_VERSION = "1.30.0"


def plain_render(folder: Path) -> list[dict]:
    """The objects a kustomization lists (resources, recursively; configMapGenerator files), without kustomize's
    transformations (labels, name hashes, patches): what the files themselves say."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = []
    for resource in spec.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += plain_render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in spec.get("configMapGenerator", []):
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                     "data": {Path(f).name: (folder / f).read_text() for f in generator["files"]}})
    return docs


def kustomize(folder: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(doc: dict) -> None:
    group_version = doc["apiVersion"].replace("/", "_")
    vendored = SCHEMAS / f"{group_version}_{doc['kind']}.json"
    if vendored.is_file():
        jsonschema.validate(doc, json.loads(vendored.read_text()))
    else:  # a built-in kind; an unknown kind raises SchemaNotFoundError
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def arg(container: dict, flag: str) -> str | None:
    args = container.get("args", [])
    return args[args.index(flag) + 1] if flag in args else None


def check_system(docs: list[dict], gpu: bool = True) -> None:
    for doc in docs:
        validate(doc)
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    roles = {name: d["spec"]["template"]["spec"]["containers"][0]["args"][0] for name, d in deployments.items()}
    assert sorted(set(roles.values())) == ["ingest", "store", "worker"]
    cameras = []
    for name, doc in deployments.items():
        container = doc["spec"]["template"]["spec"]["containers"][0]
        port = int(arg(container, "--metrics-port"))
        assert {"name": "metrics", "containerPort": port} in container["ports"], name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/scrape"] == "true"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        # each process on its own ACL user: the URL's user is the password file's name and the Secret key mounted
        env = {e["name"]: e["value"] for e in container["env"]}
        user = env["REDIS_URL"].split("//")[1].split("@")[0]
        assert env["REDIS_PASSWORD_FILE"] == f"/run/secrets/redis/{user}"
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        assert volumes["redis"]["secret"]["items"] == [{"key": user, "path": user}], name
        if roles[name] == "ingest":
            assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"] == {"type": "Recreate"}, name
            cameras.append(arg(container, "--camera"))
            assert user == f"camera-{cameras[-1]}"
        if roles[name] == "worker":
            assert "replicas" not in doc["spec"]  # KEDA owns the replica count
            assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert cameras
    (redis,) = by_kind["StatefulSet"]
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    assert arg(server, "--appendonly") == "yes" and arg(server, "--aclfile") == "/data/users.acl"
    assert arg(server, "--maxmemory-policy") == "noeviction"
    assert server["args"][:2] == ["redis-server", "/acl/limits.conf"]  # the bounds on one command, as its config file
    assert {"name": "acl", "mountPath": "/acl", "readOnly": True} in server["volumeMounts"]
    (render,) = redis["spec"]["template"]["spec"]["initContainers"]
    assert render["command"][:3] == ["sh", "/acl/render-acl.sh", "/acl/users.acl"]
    assert {e["name"]: e["value"] for e in render["env"]}["CAMERAS"].split() == cameras  # one ACL user per camera
    (acl,) = [d for d in by_kind["ConfigMap"] if d["metadata"]["name"].startswith("patchcore-redis-acl")]
    assert acl["data"]["users.acl"] == (ROOT / "deploy/redis/users.acl").read_text()
    assert acl["data"]["limits.conf"] == (ROOT / "deploy/redis/limits.conf").read_text()
    volumes = {v["name"]: v for v in redis["spec"]["template"]["spec"]["volumes"]}
    assert volumes["acl"]["configMap"]["name"] == acl["metadata"]["name"]
    (job,) = by_kind["Job"]
    assert "bank publish" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    (scaled,) = by_kind["ScaledObject"]
    assert roles[scaled["spec"]["scaleTargetRef"]["name"]] == "worker"
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(Keys().frames(c) for c in cameras)
    # XLEN = undelivered + pending, because every outcome deletes its frame (test_cluster: XLEN 0 once all are scored)
    assert all("consumerGroup" not in t["metadata"] and int(t["metadata"]["streamLength"]) > 0 for t in triggers)
    (auth,) = by_kind["TriggerAuthentication"]
    assert {t["authenticationRef"]["name"] for t in triggers} == {auth["metadata"]["name"]}


def test_manifests_validate_offline_and_describe_a_working_system():
    check_system(plain_render(K8S))
    for doc in plain_render(K8S / "prometheus-operator"):
        validate(doc)


def test_a_misspelled_field_or_a_wrong_scaler_parameter_is_refused():
    (worker,) = [d for d in plain_render(K8S) if d["metadata"]["name"] == "patchcore-worker" and d["kind"] == "Deployment"]
    worker["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker)
    (scaled,) = [d for d in plain_render(K8S) if d["kind"] == "ScaledObject"]
    scaled["spec"]["triggers"][0]["metadata"]["lagcount"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed; the plain files "
                                                           "are validated by the test above")
def test_kustomize_renders_every_overlay_into_valid_objects():
    check_system(kustomize(K8S))
    check_system(kustomize(K8S / "cpu"), gpu=False)
    rendered = kustomize(K8S / "prometheus-operator")
    check_system([d for d in rendered if d["kind"] != "PodMonitor"])
    (monitor,) = [d for d in rendered if d["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in rendered if d["kind"] == "Deployment"]
    assert pods and all(selector.items() <= labels.items() for labels in pods)  # it scrapes every process

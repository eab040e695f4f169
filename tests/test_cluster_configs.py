"""Every file in cluster/ is checked by the code that will consume it:

* launcher YAMLs: Ray's own JSON schema (ray/autoscaler/ray-schema.json) on the file as written, then
  `prepare_config` + `validate_config`, the same steps `ray up` runs before touching a cloud;
* KubeRay manifests: the fields the controllers require, then Ray's KubeRay autoscaler translation
  (`_derive_autoscaling_config_from_ray_cr`), which is what the in-tree autoscaler sidecar runs;
* Serve configs: Serve's `ServeDeploySchema`, and the import path must import and build.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import pytest
import ray
import yaml

from sprec_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
RUN_CLAIM = "sprec-runs"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# ---- VM launcher configs -------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_ray_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    jsonschema.validate(raw, _ray_schema())
    # `ray up` fills in the provider defaults and validates again before bootstrapping the cloud
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_schema_check_can_fail():
    jsonschema = pytest.importorskip("jsonschema")

    raw = _load("aws.yaml")
    raw["available_node_types"]["gpu_worker"]["min_wokers"] = 0  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        jsonschema.validate(raw, _ray_schema())


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(name, provider):
    cfg = _load(name)
    assert cfg["provider"]["type"] == provider
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not be a GPU machine"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for t in gpu_types.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1  # scale from zero
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    for t in gpu_types.values():
        nc = t["node_config"]
        if provider == "aws":
            assert re.match(r"(g|p)\d", nc["InstanceType"]), nc["InstanceType"]
        else:  # GCP: accelerators attached explicitly (N1) or by an accelerator-optimised machine type
            assert nc.get("guestAccelerators") or re.match(r"(a2|a3|g2)-", nc["machineType"])
            assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE"  # GPU VMs cannot live-migrate


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_this_project(name):
    cfg = _load(name)
    assert "." in cfg["file_mounts"].values(), "the checkout must be shipped to the nodes"
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"pip install .*-e .*sprec-ray\[gpu\]", setup) or "SPREC_GPU=1" in setup
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-"), \
        "the cluster image must run the Ray version the project is tested with"


def test_selfplay_gpu_config_loads_and_asks_for_gpus():
    cfg = load_config(CLUSTER / "selfplay_gpu.yaml")
    assert cfg.train.use_gpu and cfg.generation.gpus_per_actor >= 1
    assert cfg.output_dir.startswith("/mnt/runs/")  # on the PVC the KubeRay manifests mount


# ---- KubeRay ---------------------------------------------------------------------------------------
def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name, kind", list(KUBERAY.items()))
def test_kuberay_manifest_fields(name, kind):
    doc = _load(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for c in _containers(head):
        assert c["image"] and c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        for c in _containers(g):
            assert c["image"] and c["resources"]["limits"] and c["resources"]["requests"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g))]
    assert gpu, "no GPU worker group"
    for g in gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        for c in _containers(g):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_autoscaler_sees_gpu_workers(name):
    """Ray's KubeRay autoscaler reads the CR like this; GPU limits must surface as Ray GPU resources."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = _load(f"kuberay/{name}")
    cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"}, "spec": _cluster_spec(doc)}
    derived = _derive_autoscaling_config_from_ray_cr(cr)  # also runs validate_config
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"].get("CPU", 0) == 0 and "GPU" not in types["headgroup"]["resources"]
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu.values())
    assert derived["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_pods_mount_the_shared_run_volume(name):
    spec = _cluster_spec(_load(f"kuberay/{name}"))
    pvc = _load("kuberay/runs-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == RUN_CLAIM
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert any(claims.get(v) == RUN_CLAIM and mounts.get(v) == "/mnt/runs" for v in claims)


def test_rayjob_runs_selfplay():
    doc = _load("kuberay/rayjob.yaml")
    m = re.fullmatch(r"python (jobs/selfplay\.py) --config (\S+)(.*)", doc["spec"]["entrypoint"])
    assert m, doc["spec"]["entrypoint"]
    assert (REPO / m.group(1)).is_file()
    cfg = load_config(REPO / m.group(2), m.group(3).split())
    assert cfg.train.use_gpu
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def _check_serve_config(serve_cfg: dict) -> list[dict]:
    from ray.serve.schema import ServeDeploySchema

    from sprec_ray.serve.app import BUILD_ARGS

    ServeDeploySchema.model_validate(serve_cfg)
    apps = serve_cfg["applications"]
    for app in apps:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert set(app["args"]) <= set(BUILD_ARGS) and app["args"]["run_dir"]
    return apps


def test_rayservice_serves_the_rayjob_output():
    doc = _load("kuberay/rayservice.yaml")
    apps = _check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    job_cfg = load_config(CLUSTER / "selfplay_gpu.yaml")
    for app in apps:
        # the service reads the run dir the RayJob writes, on the same PVC
        assert app["args"]["run_dir"] == job_cfg.output_dir
        served = load_config(CLUSTER / "selfplay_gpu.yaml", app["args"].get("overrides", []))
        assert served.generation.gpus_per_actor >= 1 and served.serve.max_replicas > served.serve.min_replicas


def test_serve_config_file():
    apps = _check_serve_config(_load("serve_config.yaml"))
    for app in apps:
        load_config(None, app["args"].get("overrides", []))  # every override names a real key


def test_dockerfile_pins_ray_and_installs_gpu_extra():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-\S*gpu", text, re.M)
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text

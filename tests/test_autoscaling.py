"""The autoscaling behaviour of cluster/aws.yaml, proven on one machine with Ray's fake multi-node provider.

`cluster/fake_autoscale.py` starts a real Ray head (free ports, private temp dir) whose autoscaler
runs the launcher config's node types with provider `fake_multinode`: "launching a VM" starts a
real raylet on this machine. GPU tasks the head cannot host must make it add GPU workers, and the
workers must be terminated once idle.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "aws.yaml"


def _fake_autoscale():
    spec = importlib.util.spec_from_file_location("fake_autoscale", REPO / "cluster" / "fake_autoscale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fake_config_keeps_the_cloud_node_types():
    from ray.autoscaler._private.util import validate_config

    fa = _fake_autoscale()
    real = yaml.safe_load(AWS.read_text())
    fake = fa.fake_config(AWS, "127.0.0.1:1", idle_timeout_minutes=0.1)
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"
    workers = {n: t for n, t in real["available_node_types"].items() if n != real["head_node_type"]}
    assert set(fake["available_node_types"]) == {*workers, fa.FAKE_HEAD_TYPE}
    for name, t in workers.items():
        f = fake["available_node_types"][name]
        assert f["resources"].get("GPU", 0) == t["resources"].get("GPU", 0)
        assert f["min_workers"] == t["min_workers"] == 0
        assert 1 <= f["max_workers"] <= t["max_workers"]
        assert f["resources"]["CPU"] <= fa.MAX_CPUS_PER_NODE
    assert fake["available_node_types"][fa.FAKE_HEAD_TYPE]["resources"].get("GPU", 0) == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gpu_demand_adds_fake_nodes_and_idle_removes_them():
    import psutil

    fa = _fake_autoscale()
    result = fa.run_demo(AWS, num_tasks=2, hold_s=3.0, idle_timeout_minutes=0.1, removal_timeout_s=90.0)
    print({k: v for k, v in result.items() if k != "autoscaler_log"})
    assert result["gpu_workers_before"] == 0
    # two tasks, each needing a GPU and a whole fake node's CPUs: two GPU workers had to be launched
    assert result["gpu_workers_peak"] >= 2
    assert len(result["task_nodes"]) == 2 and set(result["task_nodes"]) <= set(result["gpu_worker_ids_peak"])
    # ... and were terminated by the autoscaler for being idle, not by us
    assert result["gpu_workers_after"] == 0
    log = "\n".join(result["autoscaler_log"])
    assert "Adding" in log and "gpu_worker" in log and "(idle)" in log
    # nothing of the fake cluster is left running
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(result["temp_dir"] in part for part in (p.info["cmdline"] or ()))]
    assert not leftovers

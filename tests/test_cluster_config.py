"""cluster.yaml: valid for Ray's own cluster-launcher schema, CPU head + GPU workers, project on every node."""

import copy
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_for_rays_schema(config):
    # prepare_config merges the provider's defaults, as `ray up` does, then the schema check.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_validator_rejects_a_broken_copy(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker.gpu"]["max_workerz"] = 2
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_cpu_head_and_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["InstanceType"]
    workers = [name for name in types if name != config["head_node_type"]]
    assert head.startswith("m5")  # no GPU on the head
    assert workers == ["worker.gpu"]
    assert types["worker.gpu"]["node_config"]["InstanceType"].startswith(("g5", "g6", "p3", "p4", "p5"))
    assert types["worker.gpu"]["min_workers"] >= 1


def test_project_installed_on_every_node(config):
    (remote, local), = config["file_mounts"].items()
    assert local == "."
    assert any(f"pip install -e {remote}" in cmd for cmd in config["setup_commands"])
    assert config["head_setup_commands"] == [] and config["worker_setup_commands"] == []

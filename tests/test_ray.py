"""Ray for real: a cluster started by `ray start --head` (tests/services/ray.sh), joined by a sweep.

Only in the Ray environment (pip install -e ".[dev,ray]": hydra-ray-launcher pins cloudpickle<3,
which the joblib launcher cannot use); CI runs it there: pytest -m ray.
"""

import pytest
from helpers import TINY, run_py, sweep_runs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_sweep_joins_a_running_ray_cluster(ray_cluster, tmp_path):
    from cluster_services import need_module

    need_module("hydra_plugins.hydra_ray_launcher", 'pip install -e ".[dev,ray]" (its own environment)')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["-m", "hydra/launcher=ray_local", "hydra.launcher.ray.init.address=auto", "seed=0,1,2,3", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=uri, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # joined the cluster the fixture started (address=auto never starts one of its own)
    joined = [line for line in (result.stdout + result.stderr).splitlines() if "Connecting to existing Ray" in line]
    assert joined and joined[0].rstrip(".").endswith(":" + ray_cluster.rsplit(":", 1)[1]), joined
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2", "3"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val/exact_match", "test/exact_match", "train/loss"} <= set(child.data.metrics)

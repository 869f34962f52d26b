# ---- training-side test support (test_models/test_metrics/test_train/test_leaderboard) ----
import os as _os
import sys as _sys
from pathlib import Path as _Path

import pytest

_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
if str(_Path(__file__).resolve().parent.parent) not in _sys.path:  # `from tests.fixtures import ...` under plain `pytest`
    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))


_os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as erc.training.cluster.init_ray sets it


@pytest.fixture(scope="session")
def ray_session():
    """One Ray for the whole test session (each start costs seconds): a real two-node cluster on this machine,
    two logical CPUs a node, so that multi-worker runs can be spread over nodes."""
    import socket

    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as s:  # a free dashboard port: another Ray on the machine may hold the default one
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    forget_cluster(cluster.address)


def forget_cluster(address: str) -> None:
    """Remove Ray's pointer to a cluster that is gone. Ray processes that look for "the" cluster read it (Ray Train's
    placement-group cleaner does); pointing at a dead one they wait on it, and a later search never gets its CPUs."""
    import tempfile

    marker = _Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if marker.is_file() and marker.read_text().strip() == address:
        marker.unlink()


@pytest.fixture(scope="session")
def tiny_emotion(tmp_path_factory):
    """A tiny prepared emotion dataset (3 classes; text16 learnable, audio8 with one row missing)."""
    from tests.fixtures import make_prepared

    return make_prepared(tmp_path_factory.mktemp("tiny") / "emotion", kind="emotion")


@pytest.fixture(scope="session")
def tiny_mosi(tmp_path_factory):
    """A tiny MOSI-like prepared dataset (binary sentiment target plus a continuous score)."""
    from tests.fixtures import make_prepared

    return make_prepared(tmp_path_factory.mktemp("tiny") / "mosi", kind="mosi")


@pytest.fixture(scope="module")
def emotion_task(tiny_emotion):
    from tests.fixtures import task_of

    return task_of(tiny_emotion)


@pytest.fixture(scope="module")
def mosi_task(tiny_mosi):
    from tests.fixtures import task_of

    return task_of(tiny_mosi)

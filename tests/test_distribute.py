"""Training as a cluster of processes (MultiWorkerMirroredStrategy from TF_CONFIG) and the role each one plays."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_separable_folder

from classifier.distribute import cluster_role
from classifier.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def tf_config(index: int, ports: list[int]) -> str:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def test_the_role_comes_from_tf_config_and_a_bad_one_is_named():
    assert cluster_role({}).workers == 1 and cluster_role({}).is_chief
    assert not cluster_role({"TF_CONFIG": tf_config(1, [1, 2])}).is_chief
    assert cluster_role({"TF_CONFIG": tf_config(0, [1, 2])}).is_chief
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    assert not cluster_role({"TF_CONFIG": json.dumps(with_chief)}).is_chief  # the chief task writes, not worker 0
    assert cluster_role({"TF_CONFIG": json.dumps(with_chief)}).workers == 2
    with pytest.raises(UserError, match="TF_CONFIG is not a usable cluster description"):
        cluster_role({"TF_CONFIG": "{not json"})


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_train_one_run_and_only_the_chief_writes(tmp_path):
    # 8 per class: 3 validation images, fewer than a global batch and an odd number for 2 workers.
    images = write_separable_folder(tmp_path / "images", per_class=8, size=40)
    output, scratch = tmp_path / "runs", tmp_path / "tmp"
    scratch.mkdir()
    ports = free_ports(2)
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(images), "--output-dir", str(output)]
    command += ["--name", "cluster", "--image-size", "32", "--batch-size", "4", "--weights", "none", "--epochs", "1"]
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=tf_config(index, ports), TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2")
        with open(tmp_path / f"worker{index}.log", "w") as log:  # the child keeps its own copy of the handle
            workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    codes = [worker.wait(timeout=600) for worker in workers]
    logs = [(tmp_path / f"worker{index}.log").read_text() for index in range(2)]
    assert codes == [0, 0], logs
    assert "worker 0 of a 2-process cluster (chief" in logs[0]
    assert "worker 1 of a 2-process cluster" in logs[1] and "finished; the chief wrote the run folder" in logs[1]
    run = output / "cluster"
    assert sorted(path.name for path in output.iterdir()) == ["cluster"]
    for name in ("config.yaml", "split.json", "labels.txt", "model.keras", "metrics.json", "history.csv"):
        assert (run / name).is_file(), name
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 2  # a header and one epoch of each phase
    assert list(scratch.iterdir()) == []  # the other worker removed its temporary run folder


def test_evaluation_batches_never_leave_a_worker_without_an_image():
    from classifier.train import _batch_leaving_no_worker_empty

    for count, batch, replicas in ((3, 4, 2), (393, 64, 2), (65, 64, 2), (9, 8, 4), (2, 32, 2)):
        size = _batch_leaving_no_worker_empty(count, batch, replicas)
        sizes = [size] * (count // size) + ([count % size] if count % size else [])
        assert size <= batch and sum(sizes) == count and min(sizes) >= replicas, (count, batch, replicas, sizes)

"""Training as a cluster of processes (MultiWorkerMirroredStrategy from TF_CONFIG) and the role each one plays."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, write_separable_folder

from classifier.distribute import cluster_role, make_strategy, replica_devices
from classifier.errors import UserError
from classifier.train import main as train_main

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


def test_one_default_device_trains_without_a_strategy_and_names_its_device():
    """One replica on the device TensorFlow places on anyway gets no tf.distribute strategy (a one-device
    MirroredStrategy made phase 1's head fit three times slower); the log still names the device."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("on a machine with a GPU, `auto` and `cpu` are different devices")
    for devices in ("auto", "cpu", "cpu:0"):
        strategy = make_strategy(devices, cluster_role({}))
        assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
        assert [name.split("device:")[-1] for name in replica_devices(strategy)] == ["CPU:0"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def start_workers():
    """Starts the two workers of a cluster; whatever happens in the test, none outlives it."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], folder: Path, scratch: Path, attempt: int) -> list[subprocess.Popen]:
        ports, workers = free_ports(2), []
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=tf_config(index, ports), TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2")
            with open(folder / f"worker{index}-{attempt}.log", "w") as log:  # the child keeps its own handle
                workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        started.extend(workers)
        return workers

    yield start
    for worker in started:
        worker.kill()
        worker.wait()


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as handle:
        return list(csv.DictReader(handle))


# Phase 1 is epoch 0, phase 2 epochs 1-2. No dropout and no augmented feature views (random draws that differ per
# worker), and 24 training images: whole global batches of 8 in both phases, so no worker drops a remainder that
# one process would train on.
EPOCHS = ["--head-epochs", "1", "--finetune-epochs", "2", "--augment", "none"]
EPOCHS += ["--set", "model.dropout=0", "--set", "train.feature_views=0"]


def test_a_killed_cluster_restarts_from_its_backup_and_matches_one_process(tmp_path, start_workers, capsys):
    images = write_separable_folder(tmp_path / "images", per_class=12, size=40)  # 24 train, 6 val, 6 test
    output, scratch = tmp_path / "runs", tmp_path / "tmp"
    scratch.mkdir()
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(images), "--output-dir", str(output)]
    command += ["--name", "cluster", "--image-size", "32", "--batch-size", "4", *TINY, *EPOCHS]
    run = output / "cluster"
    state = run / "checkpoints" / "phase2_backup" / "state.json"

    # Attempt 1: worker 1 dies once phase 2 has backed up its first epoch; the scheduler then stops the job.
    workers = start_workers(command, tmp_path, scratch, attempt=1)
    deadline = time.monotonic() + 300
    while not state.exists():
        assert all(worker.poll() is None for worker in workers), "a worker ended before the moment to kill it"
        assert time.monotonic() < deadline, "phase 2 never backed up an epoch"
        time.sleep(0.02)
    workers[1].send_signal(signal.SIGKILL)
    workers[0].send_signal(signal.SIGKILL)
    for worker in workers:
        worker.wait(timeout=60)
    reached = json.loads(state.read_text())["epoch"]

    # Attempt 2: the same command on both workers finishes the run from the backup.
    workers = start_workers(command, tmp_path, scratch, attempt=2)
    codes = [worker.wait(timeout=600) for worker in workers]  # bounded; the fixture kills what is left
    logs = [(tmp_path / f"worker{index}-2.log").read_text() for index in range(2)]
    assert codes == [0, 0], logs
    assert "worker 0 of a 2-process cluster (chief" in logs[0]
    assert f"continuing phase 2 after epoch {reached}" in logs[0] and "Phase 1/2: already finished" in logs[0]
    assert "continuing from the chief's state" in logs[1] and "finished; the chief wrote the run folder" in logs[1]
    assert [int(row["epoch"]) for row in history(run)] == [0, 1, 2]
    assert sorted(path.name for path in output.iterdir()) == ["cluster"]
    # The other worker removed its temporary run folder, and the one of its killed first attempt. (TensorFlow's own
    # autograph files of the killed processes stay: they are TensorFlow's to name and a SIGKILL leaves them.)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("classifier-")] == []

    # The same global batch (2 x 4) and seed in one process, run here through `train.main`: one replica (the
    # oracle), and two replicas of MirroredStrategy over the two logical CPUs conftest.py sets up, whose global batch
    # is the per-replica batch times two.
    flags = ["--image-size", "32", *TINY, *EPOCHS]

    def train_here(name: str, batch: str, devices: str) -> str:
        capsys.readouterr()
        argv = ["--data-dir", str(images), "--output-dir", str(tmp_path / name), "--name", name]
        assert train_main([*argv, "--batch-size", batch, "--devices", devices, *flags]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    printed = train_here("two", "4", "cpu:0,cpu:1")
    assert "2 replica(s)" in printed and "global batch 8" in printed
    assert "3/3" in printed  # 24 training images / global batch 8 = 3 steps per fine-tuning epoch
    assert "1 replica(s)" in train_here("one", "8", "cpu")
    one, two = tmp_path / "one" / "one", tmp_path / "two" / "two"

    def layout(folder: Path) -> set[str]:
        # Event files carry the host name and time in their names: compared by folder.
        return {
            str(p.relative_to(folder).parent if "tfevents" in p.name else p.relative_to(folder))
            for p in folder.rglob("*")
        }

    assert layout(run) == layout(one) == layout(two)
    one_process = history(one)
    for other in (history(run), history(two)):
        # Phase 1 (the head on features, whole global batches of the same 8 feature rows split 4 + 4 between the
        # workers or replicas, gradients summed across them) matches one replica to float rounding: initialisation,
        # batch split and the all-reduce are right.
        assert float(other[0]["val_loss"]) == pytest.approx(float(one_process[0]["val_loss"]), rel=1e-4)
        # Phase 2 trains on the same images per epoch but not in the same order (the cluster measured 2.6 % apart
        # after two epochs; the cluster path of Keras' fit draws tf.data's reshuffle once more, we believe, not
        # verified): within 10 %, the spread of a 6-image validation loss between shuffle orders, and far from a
        # broken run's (untrained: ln 3).
        assert float(other[-1]["val_loss"]) == pytest.approx(float(one_process[-1]["val_loss"]), rel=0.1)


def test_evaluation_batches_never_leave_a_worker_without_an_image():
    from classifier.train import _batch_leaving_no_worker_empty

    for count, batch, replicas in ((3, 4, 2), (393, 64, 2), (65, 64, 2), (9, 8, 4), (2, 32, 2)):
        size = _batch_leaving_no_worker_empty(count, batch, replicas)
        sizes = [size] * (count // size) + ([count % size] if count % size else [])
        assert size <= batch and sum(sizes) == count and min(sizes) >= replicas, (count, batch, replicas, sizes)

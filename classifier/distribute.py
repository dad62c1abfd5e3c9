"""Which tf.distribute strategy a training process runs under, and its role in a cluster.

One host: `MirroredStrategy` over the chosen devices (every GPU, else the CPU), or no strategy at all (TensorFlow's
default one) when that is one device TensorFlow places on anyway. Several hosts (or several
processes): `MultiWorkerMirroredStrategy`, when `TF_CONFIG` names a cluster of more than one worker (the
TensorFlow convention, which Slurm and Kubernetes launchers write) or `runtime.devices=multi_worker`.
Every worker runs the same `train.py` command; the chief (worker 0, or the task of type `chief`) writes the run
folder, the others write to a temporary folder that they remove at the end.

Keras 3 `Model.fit` does not run under `MultiWorkerMirroredStrategy` as released (keras-team/keras#20585):
`_keras_20585_workaround` patches the two places that fail, and each patch first calls Keras' own code and only
takes over when that raises the error of the issue, so it is a no-op once Keras fixes it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from classifier.errors import UserError

MULTI_WORKER = "multi_worker"


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's place in a cluster.

    Attributes:
        task_type: `worker` or `chief` (from TF_CONFIG); `worker` when there is no cluster.
        index: Task index within its type.
        workers: Processes in the cluster (1 without one).
    """

    task_type: str = "worker"
    index: int = 0
    workers: int = 1

    @property
    def is_chief(self) -> bool:
        """The process that writes the run folder: the `chief` task, else worker 0."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0 and not self._has_chief)

    _has_chief: bool = False

    def describe(self) -> str:
        if self.workers == 1:
            return "single process"
        kind = "chief, writes the run folder" if self.is_chief else "writes to a temporary folder it removes"
        return f"{self.task_type} {self.index} of a {self.workers}-process cluster ({kind})"


def cluster_role(environ: dict | None = None) -> Role:
    """Reads TF_CONFIG (absent, empty or a one-process cluster: a single process).

    Raises:
        UserError: TF_CONFIG is not JSON or does not say which task this process is.
    """
    text = (environ if environ is not None else os.environ).get("TF_CONFIG", "").strip()
    if not text:
        return Role()
    try:
        config = json.loads(text)
        cluster, task = config.get("cluster") or {}, config.get("task") or {}
        workers = sum(len(addresses) for kind, addresses in cluster.items() if kind in ("chief", "worker"))
        if workers <= 1:
            return Role()
        return Role(str(task["type"]), int(task["index"]), workers, _has_chief=bool(cluster.get("chief")))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(
            f"TF_CONFIG is not a usable cluster description ({error}): it must be JSON like "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}; '
            "unset it to train in one process."
        ) from None


def make_strategy(devices: str, role: Role | None = None) -> tf.distribute.Strategy:
    """The strategy for `runtime.devices`: `auto` (a cluster when TF_CONFIG names one, else every visible GPU,
    else the CPU), `cpu`, `multi_worker`, or a comma list such as `gpu:0,gpu:1`.

    Raises:
        UserError: a requested device does not exist (the message lists those that do), or `multi_worker`
            without a cluster in TF_CONFIG.
    """
    role = role or cluster_role()
    if devices == MULTI_WORKER or (devices == "auto" and role.workers > 1):
        if role.workers <= 1:
            raise UserError(
                "runtime.devices=multi_worker needs a cluster: set TF_CONFIG on every worker (see the README, "
                "'Many GPUs and many hosts'), or use devices=auto to train in one process."
            )
        _keras_20585_workaround()
        return tf.distribute.MultiWorkerMirroredStrategy()
    available = _logical_devices()
    if devices == "auto":
        names = [name for short, name in available.items() if short.startswith("gpu")] or [available["cpu:0"]]
    elif devices == "cpu":
        names = [available["cpu:0"]]
    else:
        names = []
        for item in devices.split(","):
            key = item.strip().lower()
            if key not in available:
                raise UserError(f"--devices: no device '{item}' here; available: {', '.join(sorted(available))}.")
            names.append(available[key])
    if names == [_default_device(available)]:
        # One replica on the device TensorFlow uses by default: its default strategy, not a one-device
        # MirroredStrategy, whose every `fit` epoch builds a distributed iterator for training and another for
        # validation. Measured on phase 1's head fit (1,344 x 1,280 features, 30 epochs of 6 steps, the run's
        # callbacks; 2-core EPYC): 15.4-16.9 s under MirroredStrategy, 5.2-5.3 s without (OneDeviceStrategy: 21.3 s).
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=names)


def replica_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """The devices `strategy`'s replicas run on (for the default strategy: the one TensorFlow places on)."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # "worker_devices() method unsupported by default tf.distribute.Strategy"
        return [_default_device(_logical_devices())]


def _logical_devices() -> dict[str, str]:
    """{"cpu:0": full name, "gpu:0": ..., ...} of this process's logical devices."""
    return {d.name.split("device:")[-1].lower(): d.name for d in tf.config.list_logical_devices()}


def _default_device(available: dict[str, str]) -> str:
    """The device TensorFlow places operations on when nothing says otherwise: the first GPU, else the CPU."""
    return available.get("gpu:0", available["cpu:0"])


_patched = False


def _keras_20585_workaround() -> None:
    """Lets Keras 3 `fit` run under MultiWorkerMirroredStrategy (https://github.com/keras-team/keras/issues/20585).

    Two places fail with more than one worker (Keras 3.15, TensorFlow 2.21):
    1. `TensorFlowTrainer._maybe_symbolic_build` averages the first input batch across replicas with
       `strategy.reduce` only to learn its shapes; under the multi-worker strategy that raises `ValueError:
       Attempt to convert a value (PerReplica ...)`. This worker's own first replica has the same shapes.
    2. `reduce_per_replica(..., "mean")` averages every metric with `strategy.reduce("MEAN", v, axis=0)`, and the
       metrics are scalars: `ValueError: Invalid reduction dimension 0 for input with 0 dimensions`. A scalar's
       mean across replicas is `axis=None`.
    Both patches call Keras' code first and take over only when it raises, so a fixed Keras runs untouched.
    """
    global _patched
    if _patched:
        return
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        try:
            return build(self, iterator=iterator, data_batch=data_batch)
        except ValueError as error:
            if "PerReplica" not in str(error) or iterator is None:
                raise
        for _, _, batches in iterator:
            batch = next(batches)
            break
        local = tree.map_structure(lambda v: self.distribute_strategy.experimental_local_results(v)[0], batch)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=local)

    reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        try:
            return reduce(values, strategy, reduction)
        except ValueError:
            if reduction not in ("auto", "mean") or not tf_trainer._collective_all_reduce_multi_worker(strategy):
                raise

        def mean(value):
            if strategy.experimental_local_results(value)[0].shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce(value, strategy, reduction)

        return tree.map_structure(mean, values)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _patched = True

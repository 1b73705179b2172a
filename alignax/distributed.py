"""Multi-host start-up: one call that turns a launch on several hosts into one JAX program.

:func:`initialize` wraps ``jax.distributed.initialize`` so that the same training script runs on one
host (it does nothing) and on many (every process calls it with the same coordinator, before any JAX
work). After it, ``jax.devices()`` lists every host's devices, ``alignax.make_mesh`` spans them
all, and the engine (``alignax.train.loop.fit``) feeds each host its share of the batch, writes
files from process 0 only and checkpoints collectively.

Settings come from the arguments, else from these environment variables:

* ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordinator (JAX's own name);
* ``JAX_NUM_PROCESSES``: the number of processes;
* ``JAX_PROCESS_ID``: this process's index in ``[0, JAX_NUM_PROCESSES)``;
* ``JAX_LOCAL_DEVICE_IDS``: the accelerators this process drives (read by JAX itself).

On a cluster that JAX recognises (SLURM, Open MPI, Kubernetes, Cloud TPU) with more than one task,
unset values are filled in by JAX's own detection. With nothing set and no multi-task cluster
present, :func:`initialize` is a no-op, so single-host runs need nothing.
"""

import os

import jax
import numpy as np

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Variables whose presence with a task count above 1 means a multi-task launch JAX can detect.
_CLUSTER_TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
# A Cloud TPU VM lists its slice's hosts here (comma-separated); JAX finds the rest itself.
_TPU_HOSTS = "TPU_WORKER_HOSTNAMES"


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None or raw.strip() == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _multi_task_cluster() -> bool:
  for name in _CLUSTER_TASK_COUNTS:
    raw = os.environ.get(name, "")
    if raw.isdigit() and int(raw) > 1:
      return True
  hosts = [h for h in os.environ.get(_TPU_HOSTS, "").split(",") if h.strip()]
  return len(hosts) > 1


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins this process to a multi-host JAX run (``jax.distributed.initialize``), or does nothing.

  Call it first thing, before any JAX computation (a backend that already exists cannot join).
  Calling it again after a successful start is a no-op.

  Args:
    coordinator_address: ``host:port`` of process 0 (default ``$JAX_COORDINATOR_ADDRESS``).
    num_processes: processes in the run (default ``$JAX_NUM_PROCESSES``).
    process_id: this process's index (default ``$JAX_PROCESS_ID``).

  Returns:
    True when the process is (now) part of a distributed run, False when nothing was configured.

  Raises:
    ValueError: a malformed setting (a non-integer variable, a process id outside
      ``[0, num_processes)``, a count below 1), naming the argument or variable.
    RuntimeError: JAX's backends were started before this call.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = (coordinator_address, num_processes, process_id)
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
  if num_processes is None:
    num_processes = _env_int(NUM_PROCESSES_ENV)
  if process_id is None:
    process_id = _env_int(PROCESS_ID_ENV)
  configured = (coordinator_address, num_processes, process_id)
  if all(v is None for v in configured) and not _multi_task_cluster():
    return False
  if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
  if process_id is not None and (
    isinstance(process_id, bool) or process_id < 0
    or (num_processes is not None and process_id >= num_processes)
  ):
    raise ValueError(f"process_id={process_id!r} must lie in [0, num_processes={num_processes})")
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    source = "arguments" if any(v is not None for v in explicit) else "environment"
    raise RuntimeError(
      f"alignax.distributed.initialize was called (settings from the {source}) after JAX had "
      "started its backends; call it before any JAX computation (first thing in the script)"
    )
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def shutdown() -> None:
  """Leaves the distributed run (``jax.distributed.shutdown``); a no-op when not initialized."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0; every process of a one-host run)."""
  return jax.process_index() == 0


def to_host(array: jax.Array | np.ndarray) -> np.ndarray:
  """The whole array as a NumPy array on this host.

  An array with shards on other hosts is gathered (``multihost_utils.process_allgather``): a
  collective, so every process must call it, in the same order, even those that will not write.
  """
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))

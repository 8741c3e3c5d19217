"""Multi-process start-up and the few host-level agreements a multi-controller run needs.

JAX runs one process per host (or per GPU) and every process runs the same program; the processes find each
other through `jax.distributed.initialize`, which must be called before anything touches a device. `initialize`
does that from, in order:

  1. explicit values: `distributed.coordinator_address` / `num_processes` / `process_id` in the config, or the
     environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (what
     `python -m ernie_jax.launch` sets); all three are needed, a missing one is a one-line `DistributedError`;
  2. a cluster JAX detects by itself: Cloud TPU pod slices and multislice (GCE / GKE), SLURM (inside `srun`),
     Open MPI (`mpirun`);
  3. otherwise: one process, nothing to initialise.
`distributed.cluster="off"` skips 1 and 2. The CPU backend exchanges data between processes with gloo.

Failures do not hang: a process that has not sent a heartbeat for `heartbeat_timeout` seconds is declared
dead by the coordination service and every other process stops with an error; start-up gives up after
`initialization_timeout` seconds when a process does not join.

`any_process(flag)` and `gather_json(obj)` are the host-level agreements the training loop needs: whether any
process was asked to stop (SIGTERM on one host saves one checkpoint at the same step on all), and every
process's data position (saved by process 0 with the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ernie_jax.config import ConfigError

try:  # JAX's own cluster detection and backend state (private: no public API lists the clusters)
  from jax._src import distributed as _jax_distributed
  from jax._src import xla_bridge as _xla_bridge
  from jax._src.clusters import ClusterEnv as _ClusterEnv
except ImportError:  # pragma: no cover - a JAX without them: explicit values only
  _jax_distributed = _xla_bridge = _ClusterEnv = None

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
CLUSTERS = ("auto", "off")


class DistributedError(ConfigError):
  """The multi-process set-up is incomplete or inconsistent (`config field 'distributed.<field>': ...`)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  # "auto": explicit values (below, or the JAX_* environment variables) when given, else the cluster JAX
  # detects (TPU pod / multislice, SLURM srun, Open MPI), else one process; "off": always one process.
  cluster: str = "auto"
  coordinator_address: str = ""  # host:port of process 0, reachable from every process (JAX_COORDINATOR_ADDRESS)
  num_processes: int = 0  # processes in the job; 0 = from JAX_NUM_PROCESSES or the cluster
  process_id: int = -1  # this process's index in [0, num_processes); -1 = from JAX_PROCESS_ID or the cluster
  initialization_timeout: int = 300  # seconds start-up waits for every process to join
  heartbeat_timeout: int = 100  # seconds without a heartbeat after which a process counts as dead (all stop)

  def __post_init__(self):
    if self.cluster not in CLUSTERS:
      raise DistributedError("distributed.cluster", f"must be one of {CLUSTERS}, got {self.cluster!r}")
    for name in ("initialization_timeout", "heartbeat_timeout"):
      if getattr(self, name) <= 0:
        raise DistributedError(f"distributed.{name}", f"must be > 0 seconds, got {getattr(self, name)}")


def explicit_values(cfg: DistributedConfig, environ=os.environ) -> dict[str, Any] | None:
  """{coordinator_address, num_processes, process_id} from the config, else the environment; None when none is
  given; DistributedError naming the first missing or bad one when only some are."""
  given = {"coordinator_address": cfg.coordinator_address or None,
           "num_processes": cfg.num_processes or None, "process_id": cfg.process_id if cfg.process_id >= 0 else None}
  for name, var in ENV.items():
    if given[name] is None and environ.get(var, "") != "":
      raw = environ[var]
      if name == "coordinator_address":
        given[name] = raw
      else:
        try:
          given[name] = int(raw)
        except ValueError:
          raise DistributedError(f"distributed.{name}", f"environment variable {var}={raw!r} is not an integer") from None
  if all(v is None for v in given.values()):
    return None
  for name, value in given.items():
    if value is None:
      others = ", ".join(f"{k}" for k, v in given.items() if v is not None)
      raise DistributedError(f"distributed.{name}", f"missing: {others} given but not {name}; set "
                             f"--config.distributed.{name} or {ENV[name]} on every process")
  n, i, addr = given["num_processes"], given["process_id"], given["coordinator_address"]
  if n < 1:
    raise DistributedError("distributed.num_processes", f"must be >= 1, got {n}")
  if not 0 <= i < n:
    raise DistributedError("distributed.process_id", f"{i} is outside [0, num_processes={n})")
  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError("distributed.coordinator_address", f"must be host:port (process 0's), got {addr!r}")
  return given


def detected_cluster() -> str | None:
  """The name of the cluster environment JAX would initialise from (None when there is none). Clusters JAX
  only uses on request (mpi4py) are not considered."""
  for env in getattr(_ClusterEnv, "_cluster_types", []):
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception:  # noqa: BLE001 -- a detector that cannot decide (e.g. no kubernetes module): not this one
      continue
  return None


def _backends_initialised() -> bool:
  check = getattr(_xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check is not None else False


def initialize(cfg: DistributedConfig = DistributedConfig(), environ=os.environ) -> str:
  """Join the job's other processes (see the module docstring); returns how this process started, for the
  start-up line. Idempotent: a process already initialised (or a single-process run) returns at once."""
  if jax.distributed.is_initialized():
    return f"process {jax.process_index()} of {jax.process_count()}"
  if cfg.cluster == "off":
    return "one process (distributed.cluster=off)"
  values = explicit_values(cfg, environ)
  cluster = None if values is not None else detected_cluster()
  if values is None and cluster is None:
    return "one process"
  if values is not None and values["num_processes"] == 1:
    return "one process"
  if _backends_initialised():
    raise DistributedError("distributed", "JAX's devices were already in use before the processes could join "
                           "(jax.distributed.initialize must run first): call ernie_jax.parallel.distributed."
                           "initialize() before any other JAX call in this program")
  kw = dict(initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
  try:
    if values is not None:
      jax.distributed.initialize(values["coordinator_address"], values["num_processes"], values["process_id"], **kw)
      how = f"coordinator {values['coordinator_address']}"
    else:
      jax.distributed.initialize(**kw)
      how = f"{cluster} detected"
  except (RuntimeError, ValueError) as e:
    text = " ".join(str(e).split())[:300]
    raise DistributedError("distributed", f"could not join the other processes ({text}); check that every "
                           f"process started with the same coordinator address and process count, and that "
                           f"the coordinator's port is reachable") from None
  return f"process {jax.process_index()} of {jax.process_count()} ({how})"


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))).any())


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, by process index (every process must call this at the same
  point; each process gets the whole list)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(row[:n].tobytes().decode()) for row, n in zip(everyone, sizes)]


def host_value(x) -> np.ndarray:
  """The whole value of a (possibly multi-process) array on this host: with several processes an array sharded over
  other processes' devices is gathered (every process must call this at the same point)."""
  if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
  """Wait until every process reaches `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def wait_for_others(name: str, seconds: float) -> bool:
  """Wait up to `seconds` for every process to reach `name` through the coordination service (no devices, no
  compile); False when they did not (or there is no service). Used before an error exit, so that process 0, which
  hosts the service, does not take it down while the others are still reporting the same error."""
  client = getattr(getattr(_jax_distributed, "global_state", None), "client", None)
  if client is None:
    return False
  try:
    client.wait_at_barrier(name, int(seconds * 1000))
    return True
  except Exception:  # noqa: BLE001 - a timed-out or failed barrier: the others are busy or gone
    return False

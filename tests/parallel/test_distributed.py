"""Multi-process start-up (`ernie_jax.parallel.distributed`) and the local launcher (`ernie_jax.cli.launch`) without
JAX processes: which values are used, the one-line errors, cluster detection, and a launcher that never hangs."""

import io
import os
import sys
import time

import jax
import pytest

from ernie_jax.cli import launch
from ernie_jax.parallel import distributed
from ernie_jax.parallel.distributed import DistributedConfig, DistributedError
from ernie_jax.train import config as config_lib

ENV = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}


def test_explicit_values_from_env_and_config():
  assert distributed.explicit_values(DistributedConfig(), {}) is None
  assert distributed.explicit_values(DistributedConfig(), ENV) == {
    "coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}
  cfg = DistributedConfig(coordinator_address="h:9", num_processes=2, process_id=0)
  assert distributed.explicit_values(cfg, ENV) == {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0}


@pytest.mark.parametrize("env, cfg, match", [
  ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, {}, r"'distributed.process_id': missing: "
   r"coordinator_address, num_processes given but not process_id; set --config.distributed.process_id or JAX_PROCESS_ID"),
  ({}, {"num_processes": 2, "process_id": 1}, r"'distributed.coordinator_address': missing"),
  ({**ENV, "JAX_NUM_PROCESSES": "four"}, {}, r"JAX_NUM_PROCESSES='four' is not an integer"),
  ({**ENV, "JAX_PROCESS_ID": "4"}, {}, r"'distributed.process_id': 4 is outside \[0, num_processes=4\)"),
  ({**ENV, "JAX_COORDINATOR_ADDRESS": "host0"}, {}, r"must be host:port"),
])
def test_incomplete_values_name_the_missing_field(env, cfg, match):
  with pytest.raises(DistributedError, match=match):
    distributed.explicit_values(DistributedConfig(**cfg), env)


def test_config_section_is_validated():
  c = config_lib.default_config()
  c.distributed.cluster = "slurm"
  with pytest.raises(config_lib.TrainConfigError, match=r"'distributed.cluster': must be one of \('auto', 'off'\)"):
    config_lib.parse(c)
  c = config_lib.default_config()
  c.data_shards = 3
  with pytest.raises(config_lib.TrainConfigError, match=r"'data_shards': 3 does not divide global_batch_size"):
    config_lib.parse(c)


def test_slurm_detected_only_inside_srun(monkeypatch):
  for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
    monkeypatch.delenv(k)
  monkeypatch.setenv("SLURM_JOB_ID", "7")  # an allocation, but not a task of `srun`
  assert distributed.detected_cluster() is None
  for k, v in {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
               "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(k, v)
  assert distributed.detected_cluster() == "SlurmCluster"


def test_one_process_needs_no_initialisation(monkeypatch):
  for k in ENV:
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize(DistributedConfig(cluster="off"), ENV) == "one process (distributed.cluster=off)"
  one = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
  assert distributed.initialize(DistributedConfig(), one) == "one process"
  # several processes asked for after this test process already used its devices: a clear error, not a hang
  jax.devices()
  with pytest.raises(DistributedError, match="before any other JAX call"):
    distributed.initialize(DistributedConfig(), ENV)
  # the host-level agreements are the identity with one process
  assert distributed.any_process(True) and not distributed.any_process(False)
  assert distributed.gather_json({"a": [1]}) == [{"a": [1]}]


# -- the launcher ------------------------------------------------------------------------------------------------
CHILD = """
import os, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"].startswith("localhost:"),
      "--xla_force_host_platform_device_count=3" in os.environ["XLA_FLAGS"], flush=True)
if i == 1:
  sys.exit(3)
time.sleep(600)
"""


def test_launcher_prefixes_output_and_stops_the_others_when_one_fails(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  out = io.StringIO()
  start = time.time()
  status = launch.launch([str(script)], num_processes=2, cpu_devices=3, grace=1.0, out=out)
  text = out.getvalue()
  assert status == 3, text
  assert time.time() - start < 30, text  # process 0 (sleeping) was killed after the grace period
  assert "[p0] process 0 of 2 True True" in text and "[p1] process 1 of 2 True True" in text
  assert "[launch] process 1 exited with status 3" in text and "[launch] done: status 3" in text


def test_launcher_flags(capsys):
  with pytest.raises(SystemExit):
    launch.main(["--num_processes", "2"])
  assert "give the program after --" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main(["--num_processes", "0", "--", sys.executable])
  assert "--num_processes must be >= 1" in capsys.readouterr().err

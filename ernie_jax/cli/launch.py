"""`python -m ernie_jax.launch --num_processes N [--cpu_devices D] -- SCRIPT [ARGS...]`: run a training entry point
as N cooperating processes on this machine, the way a pod slice or a SLURM job runs one per host.

  python -m ernie_jax.launch --num_processes 2 --cpu_devices 4 -- experiments/pretrain.py \\
      --config=experiments/configs/tiny.py --config.data_shards=2

Each process gets JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
`ernie_jax.parallel.distributed.initialize` reads; with --cpu_devices, the CPU backend with D devices per process
(gloo between processes: a multi-host run on one machine, for testing). SCRIPT may be `-m module`.

Output: every line of process i is printed as `[pI] line` (process 0's metrics and progress; errors from any
process). SIGTERM / SIGINT to the launcher are forwarded once to every process (each started in its own session,
so a terminal's Ctrl-C is not delivered twice): the run saves one checkpoint at the same step on all processes and
exits. When a process fails, the others are given `--grace` seconds to report and end, then killed, so the
launcher never hangs. Exit status: 0 when all exit 0, else the first failure's status (128 + signal number for a
process killed by a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, index: int, count: int, address: str, cpu_devices: int) -> dict[str, str]:
  """The environment of process `index` of `count`."""
  env = dict(base, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index),
             PYTHONUNBUFFERED="1")
  if cpu_devices:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
  stream.close()


def _status(code: int) -> int:
  return 128 - code if code < 0 else code  # (Popen reports death by signal s as -s)


def launch(command: list[str], *, num_processes: int, cpu_devices: int = 0, address: str = "", grace: float = 10.0,
           out=sys.stdout) -> int:
  """Run `command` (argv after the Python interpreter) as `num_processes` processes; their exit status."""
  address = address or f"localhost:{free_port()}"
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(os.environ, index=i, count=num_processes, address=address, cpu_devices=cpu_devices)
    p = subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1, start_new_session=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
    t.start()
    pumps.append(t)
    out.write(f"[launch] process {i} of {num_processes}: pid {p.pid} (coordinator {address})\n")
  out.flush()

  def forward(signum, frame):
    out.write(f"[launch] {signal.Signals(signum).name}: forwarding to every process\n")
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  status, failed_at, reported = 0, None, set()
  try:
    while len(reported) < len(procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code is None or i in reported:
          continue
        reported.add(i)
        pumps[i].join(timeout=2)  # (its last lines first)
        out.write(f"[launch] process {i} exited with status {_status(code)}")
        if code != 0 and failed_at is None:
          status, failed_at = _status(code), time.monotonic()
          out.write(f"; stopping the others (killed after {grace:g} s)")
        out.write("\n")
        out.flush()
      if failed_at is not None and time.monotonic() - failed_at > grace:
        for p in procs:
          if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
      time.sleep(0.05)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    for p in procs:  # (an exception in the launcher itself: no orphans)
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for t in pumps:
      t.join(timeout=5)
  out.write(f"[launch] done: status {status}\n")
  out.flush()
  return status


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(prog="python -m ernie_jax.launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, required=True, help="processes to start on this machine")
  parser.add_argument("--cpu_devices", type=int, default=0, help="CPU backend with this many devices per process")
  parser.add_argument("--coordinator", default="", help="host:port of process 0 (default: localhost, a free port)")
  parser.add_argument("--grace", type=float, default=10.0, help="seconds the others get after one process fails")
  args = parser.parse_args(own)
  if not command:
    parser.error("give the program after --, e.g. -- experiments/pretrain.py --config=experiments/configs/tiny.py")
  if args.num_processes < 1:
    parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
  if args.cpu_devices < 0:
    parser.error(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
  sys.exit(launch(command, num_processes=args.num_processes, cpu_devices=args.cpu_devices, address=args.coordinator,
                  grace=args.grace))

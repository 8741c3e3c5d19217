"""The test suite. `XLA_TEST_FLAGS` is what every test process (pytest workers and the runs they start) compiles
with: XLA's CPU backend at optimisation level 0, which compiles the suite's tiny programs ~40% faster (their run
time is negligible). Numerical claims made for the default level (e.g. merged LoRA equals unmerged within 1e-6)
compile that comparison at level 2 explicitly."""

XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"

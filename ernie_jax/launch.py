"""`python -m ernie_jax.launch --num_processes N [--cpu_devices D] -- SCRIPT [ARGS...]`: N cooperating training
processes on this machine (the command line is `ernie_jax.cli.launch`)."""

from ernie_jax.cli.launch import main

if __name__ == "__main__":
  main()

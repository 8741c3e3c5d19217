"""`python -m ernie_jax.plan --config=... --devices=N --device-memory=95GB`: the layout planner's entry
point (the command line is `ernie_jax.cli.plan`, the model `ernie_jax.train.plan` / `memory_model`)."""

from ernie_jax.cli.plan import main

if __name__ == "__main__":
  main()

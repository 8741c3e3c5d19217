"""Training.

  tasks        the `Task` contract (normalisers, loss_fn, after_update) and its implementations
               `TextLM` / `VisionLanguage`; a task owns its coefficients (`losses.LossConfig`)
  step         TrainState (model + optimizer + RNG), sharded creation, batch placement and the
               generic jitted train step (accumulation, clipping, AdamW, non-finite guard)
  losses       LM / MTP losses and `LossConfig`; moe_losses, vl_losses: router losses and the
               correction-bias update
  fp8_optim    the optax / optimizer side of FP8 training (`Fp8Optimizer`)
  optimizer    AdamW + schedules; checkpoint: Orbax training checkpoints; config: the training
               config tree; metrics, flops: logging, MFU
The entry point is `experiments/pretrain.py`.
"""

"""Training: losses (LM, MTP, MoE), optimizer, the jitted train step, checkpoints, metrics, FLOPs."""

"""Inference: KV-cached batched generation for the text models (`generate`) and ERNIE 4.5 VL
(`generate_vl`), and token sampling (`sampling`). The command line is `ernie_jax.cli.generate`."""

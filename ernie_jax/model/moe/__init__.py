"""The ERNIE 4.5 MoE: router (`router.py`), routed-expert dispatch and grouped matmuls
(`dispatch.py`), the MoE block over one or two expert sets (`block.py`), one expert-parallel
`shard_map` wrapper (`expert_parallel.py`) and its token transports (`transports/`)."""

from ernie_jax.model.moe.block import MoE, ExpertSet, Experts, text_expert_sets, vl_expert_sets
from ernie_jax.model.moe.router import Router, RouterOutput, VLRouterOutput, route

__all__ = ["ExpertSet", "Experts", "MoE", "Router", "RouterOutput", "VLRouterOutput", "route",
           "text_expert_sets", "vl_expert_sets"]

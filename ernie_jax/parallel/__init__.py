"""Device meshes and logical-axis sharding rules (expert parallelism lives with the MoE block)."""

from ernie_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from ernie_jax.parallel.sharding import (DEFAULT_RULES, ShardingError, batch_spec, logical_to_spec,
                                         shard_model, state_shardings, with_rules)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "MeshConfig", "ShardingError", "batch_spec",
           "logical_to_spec", "make_mesh", "shard_model", "state_shardings", "with_rules"]

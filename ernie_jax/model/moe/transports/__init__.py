"""Expert-parallel token transports. Each runs inside `jax.shard_map` on one device's tokens:

  fn(x [T, H], idx [T, k], weights [T, k], gate/up [E_local, H, I], down [E_local, I, H], *,
     axis: str, impl: str, lora: ExpertLora | None = None, **options) -> (y [T, H], dropped: int32 scalar)

`lora` holds the local experts' LoRA adapters (A [E_local, H, r], B [E_local, r, I], ...), applied
inside the same grouped matmul / batched einsum as their experts.

`idx` holds global expert ids; device d of the `axis` group owns experts [d*E_local, (d+1)*E_local).
"""

from ernie_jax.model.moe.transports.all_to_all import all_to_all_transport
from ernie_jax.model.moe.transports.allgather import allgather_transport
from ernie_jax.model.moe.transports.ragged import ragged_transport

TRANSPORTS = {
  "all_to_all": all_to_all_transport,
  "ragged_all_to_all": ragged_transport,
  "allgather": allgather_transport,
}

"""The device mesh: axes (data, fsdp, tensor, expert), built for any device count.

* data   - pure data parallelism (replicated parameters, gradients all-reduced);
* fsdp   - data parallelism with parameters / optimizer state sharded (ZeRO-3 style);
* tensor - tensor parallelism over heads and MLP columns;
* expert - expert parallelism: MoE experts are split over it and tokens are exchanged with
           all-to-all; activations are also batch-split over it outside the MoE.
Multi-slice / multi-host: `dcn_*` sizes give the part of each axis that spans slices (or hosts
connected by the data-center network); the product of the ICI sizes must equal the devices per slice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes per axis. One axis may be -1: it takes the remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  dcn_data: int = 1  # slices / hosts over which `data` is split (multi-slice)
  dcn_fsdp: int = 1

  def resolve(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, s in zip(MESH_AXES, sizes):
      if s == 0 or s < -1:
        raise ValueError(f"mesh.{name} must be a positive size or -1, got {s}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
      if num_devices % known:
        raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                         f"{dict(zip(MESH_AXES, sizes))} (product {known})")
      sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                       f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes MESH_AXES (all `Auto`, GSPMD-style) over `devices` (default: all devices,
  across all processes)."""
  if cfg is None:
    cfg = MeshConfig()
  elif isinstance(cfg, dict):
    cfg = MeshConfig(**cfg)
  devices = list(devices if devices is not None else jax.devices())
  sizes = cfg.resolve(len(devices))
  dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
  if math.prod(dcn) > 1:
    from jax.experimental import mesh_utils

    for name, s, d in zip(MESH_AXES, sizes, dcn):
      if s % d:
        raise ValueError(f"mesh.{name}={s} is not divisible by its dcn size {d}")
    ici = tuple(s // d for s, d in zip(sizes, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  elif len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    grid = None
  else:
    grid = np.asarray(devices).reshape(sizes)
  types = (AxisType.Auto,) * len(MESH_AXES)
  if grid is None:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=types)
  return Mesh(grid, MESH_AXES, axis_types=types)

"""Reciprocal-space sampling in the crystal frame: regular grids, windows around hkl, orientations.

A `Grid` samples q_i = centre + voxel * (i - shape // 2) along each crystal-frame axis (Å⁻¹, |q| = 1/d),
i = 0 .. shape - 1; the same index convention as a type-1 NUFFT, so every engine agrees on where a voxel
is. Windows around several hkl with one shape stack into one `Grid` with a leading batch axis on
`centre`/`voxel`, which the engines vmap over.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.errors import InputError
from jaxpolaron.structure import CrystalStructure

DEFAULT_WINDOW_SHAPE = 33
DEFAULT_WINDOW_VOXEL = 0.0025  # Å⁻¹: 33 voxels span ±0.04 Å⁻¹, inside the ±0.06 where Pnma tails start


class Grid(eqx.Module):
    """A regular q grid aligned with the crystal-frame axes.

    Attributes:
        centre: (3,) q at index shape // 2, Å⁻¹ (a leading batch axis for stacked windows).
        voxel: (3,) spacing along x, y, z, Å⁻¹.
        shape: number of samples along x, y, z.
    """

    centre: Float[Array, "... 3"]
    voxel: Float[Array, "... 3"]
    shape: tuple[int, int, int] = eqx.field(static=True)

    def __check_init__(self):
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise InputError(f"grid shape must be three positive integers, got {self.shape}.")

    def axes(self) -> tuple[Array, Array, Array]:
        """The sample positions along x, y, z: three arrays (..., n_i), Å⁻¹."""
        out = []
        for i, n in enumerate(self.shape):
            offsets = jnp.arange(n, dtype=self.voxel.dtype) - n // 2
            out.append(self.centre[..., i, None] + self.voxel[..., i, None] * offsets)
        return out[0], out[1], out[2]

    def points(self) -> Float[Array, "... nx ny nz 3"]:
        """All grid points, (..., nx, ny, nz, 3) in Å⁻¹."""
        qx, qy, qz = self.axes()
        return jnp.stack(
            jnp.broadcast_arrays(qx[..., :, None, None], qy[..., None, :, None], qz[..., None, None, :]), -1
        )

    def extent(self) -> np.ndarray:
        """(..., 3, 2) lowest and highest sample along each axis (host-side)."""
        lo = np.asarray(self.centre) - np.asarray(self.voxel) * (np.array(self.shape) // 2)
        hi = lo + np.asarray(self.voxel) * (np.array(self.shape) - 1)
        return np.stack([lo, hi], -1)


def full_grid(n: int | Sequence[int], q_max: float, *, centre=(0.0, 0.0, 0.0)) -> Grid:
    """A cube of n³ samples reaching ±q_max (Å⁻¹) around `centre`, voxel = 2 q_max / (n - 1)."""
    shape = (n, n, n) if isinstance(n, int) else tuple(int(x) for x in n)
    if min(shape) < 2 or not q_max > 0:
        raise InputError(f"a full grid needs >= 2 samples per axis and q_max > 0, got {shape}, {q_max}.")
    dtype = jnp.result_type(float)
    voxel = jnp.asarray([2.0 * q_max / (m - 1) for m in shape], dtype)
    return Grid(centre=jnp.asarray(centre, dtype), voxel=voxel, shape=shape)  # type: ignore[arg-type]


def hkl_windows(
    structure: CrystalStructure,
    hkls: Sequence[Sequence[int]],
    *,
    shape: int = DEFAULT_WINDOW_SHAPE,
    voxel: float = DEFAULT_WINDOW_VOXEL,
) -> Grid:
    """Stacked windows of shape³ voxels centred on the pseudo-cubic reflections `hkls`.

    Returns a `Grid` whose centre/voxel have a leading axis of len(hkls).
    """
    if shape < 3 or not voxel > 0:
        raise InputError(f"window shape must be >= 3 voxels and voxel > 0, got {shape}, {voxel}.")
    dtype = jnp.result_type(float)
    centres = structure.q_of_hkl(np.asarray(hkls, float).reshape(-1, 3))
    return Grid(
        centre=jnp.asarray(centres, dtype),
        voxel=jnp.full((len(centres), 3), voxel, dtype),
        shape=(shape, shape, shape),
    )


def grid_item(grid: Grid, i: int) -> Grid:
    """The i-th grid of a stacked `Grid`."""
    return Grid(centre=grid.centre[i], voxel=grid.voxel[i], shape=grid.shape)


_HKL_TOKEN = re.compile(r"-?\d")


def parse_hkl(text: str) -> tuple[int, int, int]:
    """Parse '200', '1-10' (= 1 -1 0), '2 0 0' or '10_0_0' into a Miller-index triple."""
    t = text.strip()
    parts = re.split(r"[\s_]+", t) if re.search(r"[\s_]", t) else _HKL_TOKEN.findall(t)
    joined = "".join(parts) if not re.search(r"[\s_]", t) else None
    if len(parts) != 3 or (joined is not None and joined != t):
        raise InputError(f"cannot read {text!r} as hkl: write three indices like 200, 1-10 or 10_0_0.")
    try:
        h, k, l = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"cannot read {text!r} as hkl: indices must be integers.") from None
    if h == k == l == 0:
        raise InputError("hkl 000 is the direct beam, not a reflection.")
    return h, k, l


def hkl_label(hkl: Sequence[int]) -> str:
    """'200' for (2, 0, 0), '1-10' for (1, -1, 0), '10_0_0' when an index has two digits."""
    if any(abs(int(i)) > 9 for i in hkl):
        return "_".join(str(int(i)) for i in hkl)
    return "".join(str(int(i)) for i in hkl)


def rotation_from_axis_angle(axis: Float[Array, 3], angle: Float[Array, ""]) -> Float[Array, "3 3"]:
    """Rotation matrix (3, 3) for a right-handed rotation by `angle` (rad) about `axis` (Rodrigues)."""
    axis = jnp.asarray(axis) / jnp.linalg.norm(axis)
    k = jnp.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return jnp.eye(3) + jnp.sin(angle) * k + (1.0 - jnp.cos(angle)) * (k @ k)


def rotation_from_quaternion(q: Float[Array, "... 4"]) -> Float[Array, "... 3 3"]:
    """Rotation matrices from (w, x, y, z) quaternions (normalised here)."""
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


def random_rotations(n: int, *, key: Array) -> Float[Array, "n 3 3"]:
    """n rotations uniform on SO(3) (normalised Gaussian quaternions). q_lab = R @ q_crystal."""
    return rotation_from_quaternion(jax.random.normal(key, (n, 4)))

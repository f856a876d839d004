"""Size ensembles: incoherent averages of |F|² over crystal sizes weighted by a Gamma distribution.

The paper averages crystals of 3–15 nm weighted by a Gamma distribution of shape 2.0 and mean 5.4 nm.
Sizes are sampled on a fixed grid (default 3, 4, …, 15 nm); the weights are the Gamma density at the
grid points, normalised to sum to one, so the average is differentiable in the distribution's shape
and mean while each size's intensity is computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.crystal import Nanocrystal, cut_nanocrystal
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors
from jaxpolaron.structure import CrystalStructure
from jaxpolaron.structure_factor import Engine, intensity

DEFAULT_SIZES_NM = tuple(float(s) for s in range(3, 16))
DEFAULT_GAMMA_SHAPE = 2.0
DEFAULT_MEAN_NM = 5.4


class GammaSizes(eqx.Module):
    """Gamma size distribution (number-weighted) with differentiable shape k and mean (nm).

    p(s) ∝ s^(k-1) exp(-s k / mean), i.e. scale θ = mean / k.
    """

    shape: Float[Array, ""]
    mean_nm: Float[Array, ""]

    def __init__(self, shape: float | Array = DEFAULT_GAMMA_SHAPE, mean_nm: float | Array = DEFAULT_MEAN_NM):
        self.shape = jnp.asarray(shape, jnp.result_type(float))
        self.mean_nm = jnp.asarray(mean_nm, jnp.result_type(float))

    def weights(self, sizes_nm: Float[Array, " n"]) -> Float[Array, " n"]:
        """Normalised weights (n,) of the sampled sizes (nm); the Gamma normalisation cancels."""
        s = jnp.asarray(sizes_nm, self.shape.dtype)
        log_p = (self.shape - 1.0) * jnp.log(s) - s * self.shape / self.mean_nm
        log_p = log_p - jnp.max(log_p)
        p = jnp.exp(log_p)
        return p / jnp.sum(p)


def validate_sizes(sizes_nm: Iterable[float]) -> tuple[float, ...]:
    """Check sizes (nm) are positive and finite; return them as a tuple of floats."""
    sizes = tuple(float(s) for s in sizes_nm)
    if not sizes or any(not np.isfinite(s) or s <= 0 for s in sizes):
        raise InputError(f"crystal sizes must be positive numbers of nm, got {list(sizes)}.")
    return sizes


def size_crystals(structure: CrystalStructure, sizes_nm: Sequence[float], **cut_kwargs) -> list[Nanocrystal]:
    """One crystal per size (nm), cut with `cut_nanocrystal`."""
    return [cut_nanocrystal(structure, s, **cut_kwargs) for s in validate_sizes(sizes_nm)]


def size_intensities(
    crystals: Sequence[Nanocrystal],
    scattering: ScatteringFactors,
    q: Grid | Float[Array, "n 3"],
    *,
    engine: Engine = "auto",
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Float[Array, "n_sizes ..."]:
    """|F|² of each crystal, stacked: (n_sizes, *q_shape), electrons².

    Crystals of different sizes have different atom counts, so each is its own (cached) compilation;
    `progress` wraps the loop (e.g. tqdm) for long runs.
    """
    return jnp.stack([intensity(c, scattering, q, engine) for c in progress(crystals)])


def ensemble_average(
    intensities: Float[Array, "n_sizes ..."], sizes_nm: Float[Array, " n_sizes"], distribution: GammaSizes
) -> Float[Array, ...]:
    """Σ_i w_i I_i with Gamma weights at `sizes_nm`; differentiable in the distribution parameters."""
    w = distribution.weights(jnp.asarray(sizes_nm))
    return jnp.tensordot(w, intensities, axes=1)

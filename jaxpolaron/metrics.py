"""Peak metrics of a difference volume around one reflection G.

For a window around G (crystal frame, Å⁻¹) with dark intensity I₀ and difference ΔI = I_pump − I_dark:

- radial coordinate ρ(q) = (q − G)·Ĝ (Å⁻¹); a peak moves *inward* (towards q = 0) when m1 < 0.
- m1 over a region R: Σ_R ΔI ρ / Σ_R I₀ (Å⁻¹). `m1_lobe` uses R = {|q − G| ≤ 0.025 Å⁻¹} (the main lobe of a
  ~5 nm crystal), `m1_window` the whole window. A uniform expansion ε moves the peak by −ε|G|, giving
  m1 ≈ −ε|G|κ with κ near 1.
- odd_fraction = ‖ΔI_odd‖² / ‖ΔI‖² with ΔI_odd(q) = (ΔI(q) − ΔI(q'))/2 and q' the mirror image of q through G
  along Ĝ (q' = q − 2ρĜ); 1 for a pure shift, 0 for a pure intensity change. Mirror images falling outside
  the window are left out of both norms. Undefined (NaN) when ΔI = 0.
- integrated intensities Σ I voxel³ (electrons² Å⁻³) and their relative change `delta_integrated`.
- `shift_ls`, `intensity_ls`: least-squares fit over the lobe of ΔI ≈ α I₀ − s Ĝ·∇I₀, i.e. the pumped peak
  as the dark one scaled by (1 + α) and moved by s along Ĝ (Å⁻¹). Unlike a centroid, s is not biased by an
  intensity change times the dark peak's asymmetry.

The sign of m1 can flip with the region (see notes/physics.md), so every value is reported with its region.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.reciprocal import Grid, grid_item, hkl_label

LOBE_RADIUS = 0.025  # Å⁻¹


def _mirror(values: Float[Array, "nx ny nz"], grid: Grid, g_hat: Array) -> tuple[Array, Array]:
    """values at the mirror images q' of every voxel (trilinear) and a mask of images inside the window."""
    pts = grid.points()
    rho = jnp.sum((pts - grid.centre) * g_hat, axis=-1)
    mirrored = pts - 2.0 * rho[..., None] * g_hat
    lo = grid.centre - grid.voxel * (jnp.asarray(grid.shape) // 2)
    idx = (mirrored - lo) / grid.voxel  # fractional voxel indices
    upper = jnp.asarray(grid.shape, idx.dtype) - 1
    inside = jnp.all((idx >= -1e-6) & (idx <= upper + 1e-6), axis=-1)
    coords = [jnp.clip(idx[..., i], 0.0, upper[i]) for i in range(3)]
    sampled = jax.scipy.ndimage.map_coordinates(values, coords, order=1, mode="nearest")
    return sampled, inside


def _shift_fit(grid: Grid, dark: Array, diff: Array, g_hat: Array, region: Array) -> tuple[Array, Array]:
    """Least squares of ΔI ≈ α I₀ − s Ĝ·∇I₀ over `region`; returns (s in Å⁻¹, α)."""
    grads = jnp.gradient(dark, *[grid.voxel[i] for i in range(3)])
    radial_slope = sum(g_hat[i] * grads[i] for i in range(3))
    basis = jnp.stack([jnp.where(region, -radial_slope, 0.0), jnp.where(region, dark, 0.0)], -1).reshape(-1, 2)
    target = jnp.where(region, diff, 0.0).reshape(-1)
    gram = basis.T @ basis
    solution = jnp.linalg.solve(gram + 1e-30 * jnp.trace(gram) * jnp.eye(2), basis.T @ target)
    return solution[0], solution[1]


def peak_metrics(grid: Grid, dark: Float[Array, "nx ny nz"], pump: Float[Array, "nx ny nz"]) -> dict[str, Array]:
    """Metrics of one window (a single, unstacked `Grid` centred on G). Returns 0-d arrays."""
    g = grid.centre
    g_hat = g / jnp.linalg.norm(g)
    diff = pump - dark
    pts = grid.points()
    rho = jnp.sum((pts - g) * g_hat, axis=-1)
    lobe = jnp.linalg.norm(pts - g, axis=-1) <= LOBE_RADIUS
    dv = jnp.prod(grid.voxel)
    mirrored, inside = _mirror(diff, grid, g_hat)
    shift, scale = _shift_fit(grid, dark, diff, g_hat, lobe)
    odd = 0.5 * (diff - mirrored)
    norm_all = jnp.sum(jnp.where(inside, diff**2, 0.0))
    return {
        "integrated_dark": jnp.sum(dark) * dv,
        "integrated_pump": jnp.sum(pump) * dv,
        "m1_lobe": jnp.sum(jnp.where(lobe, diff * rho, 0.0)) / jnp.sum(jnp.where(lobe, dark, 0.0)),
        "m1_window": jnp.sum(diff * rho) / jnp.sum(dark),
        "shift_ls": shift,
        "intensity_ls": scale,
        "delta_integrated": jnp.sum(diff) / jnp.sum(dark),
        "odd_fraction": jnp.where(
            norm_all > 0,
            jnp.sum(jnp.where(inside, odd**2, 0.0)) / jnp.where(norm_all > 0, norm_all, 1.0),
            jnp.nan,
        ),
    }


def _json_number(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def peak_table(
    windows: Grid, hkls, dark: Float[Array, "w nx ny nz"], pump: Float[Array, "w nx ny nz"]
) -> dict[str, dict]:
    """Per-peak table for stacked windows: {"200": {"q": [...], "integrated_dark": ..., ...}, ...}.

    JSON-ready (floats; undefined values are None). Window and lobe extents are recorded with each peak.
    """
    table = {}
    for i, hkl in enumerate(hkls):
        g = grid_item(windows, i)
        m = peak_metrics(g, dark[i], pump[i])
        half = (np.asarray(g.voxel) * (np.array(g.shape) // 2)).tolist()
        table[hkl_label(hkl)] = {
            "hkl": [int(x) for x in hkl],
            "q": [float(x) for x in np.asarray(g.centre)],
            "q_abs": float(np.linalg.norm(np.asarray(g.centre))),
            **{k: _json_number(v) for k, v in m.items()},
            "lobe_radius": LOBE_RADIUS,
            "window_half_width": half,
        }
    return table

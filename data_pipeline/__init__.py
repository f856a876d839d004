"""Reduction of EuXFEL runs into 3D dark/pump/difference volumes (see the reduction issues)."""

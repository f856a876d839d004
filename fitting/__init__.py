"""Gradient fitting of deformation models to measured difference volumes (see the fitting issue)."""

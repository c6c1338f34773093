"""Dataset analyses that need no model: :mod:`.grid_coverage` (which objects SOLO's grids make
positive) and :mod:`.grid_suggestion` (grids and scale ranges that keep them)."""
from .grid_coverage import GridCoverage, ObjectGeometry, grid_coverage, grid_coverage_from_cfg, object_geometry

__all__ = ["GridCoverage", "ObjectGeometry", "grid_coverage", "grid_coverage_from_cfg", "object_geometry"]

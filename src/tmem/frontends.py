"""cleancache and frontswap front ends (placeholder; see the front-ends work item)."""

from __future__ import annotations


class Cleancache:
    """Placeholder."""


class Frontswap:
    """Placeholder."""

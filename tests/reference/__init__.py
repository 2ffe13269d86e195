"""Naive loop references in float64, written straight from SPEC.md (one module per op family)."""

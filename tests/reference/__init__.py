"""Naive loop references in float64, written straight from the formulas of docs/ops/ (one module per
op family)."""

"""Diagnostics that look inside a model as it runs (no kernels: plain PyTorch, for inspection)."""
from lightmotion_fast.diagnostics.lion import LayerStats, LionReport, lion_diagnostics

__all__ = ["LayerStats", "LionReport", "lion_diagnostics"]

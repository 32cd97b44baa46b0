"""Integrations with the tools users already train in."""

from .hf import Trainer

__all__ = ["Trainer"]

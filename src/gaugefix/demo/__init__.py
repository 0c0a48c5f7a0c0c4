"""The embedded demo: everything is built and trained locally, nothing is downloaded."""

from .core import run_core_demo

__all__ = ["run_core_demo"]

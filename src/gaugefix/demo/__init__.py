"""The embedded demo: everything is built and trained locally, nothing is downloaded."""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]

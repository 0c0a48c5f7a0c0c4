"""The embedded demo: everything is built and trained locally, nothing is downloaded."""

from .run import DemoConfig, run_demo, run_requested

__all__ = ["DemoConfig", "run_demo", "run_requested"]

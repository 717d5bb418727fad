"""Whole jobs that chain capabilities: `fast-steer run` (the main job)."""

"""Evaluating steering: lm-eval adapter and tasks, the strength sweep, steer-eval and the results page."""

"""Activation examples for interpretability: collected once per (SAE, data, settings), then read by every
scorer (`apps.interp`), together with the judge-free proxies."""

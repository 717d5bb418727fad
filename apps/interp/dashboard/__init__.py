"""Offline feature dashboards: a static site (index + one card per feature) that works from file://."""

from apps.interp.dashboard.cards import CardConfig
from apps.interp.dashboard.site import DashboardConfig, build_dashboard

__all__ = ["CardConfig", "DashboardConfig", "build_dashboard"]

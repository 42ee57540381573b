"""Preference data shipped with infopo."""

"""Synthetic radiographs for the embedded default data set."""

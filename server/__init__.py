"""Flower ServerApp adapter over fedus."""

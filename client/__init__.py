"""Flower ClientApp adapter over fedus."""

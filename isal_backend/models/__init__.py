"""Backbones and feature extraction (torch only)."""

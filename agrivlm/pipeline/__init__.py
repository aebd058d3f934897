"""Chips → model inputs: frame sampling, multi-scale, spatial pooling, AnyRes tiles, bands, frame masks."""

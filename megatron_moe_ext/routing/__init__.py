"""Routing math in pure torch: no Megatron import anywhere in this package."""

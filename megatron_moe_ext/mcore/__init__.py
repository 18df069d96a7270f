"""Thin adapters onto Megatron-Core classes (the only place coupled to its version, with compat/)."""

"""Model classes under the reference implementation's names (parameter names match the public checkpoints)."""

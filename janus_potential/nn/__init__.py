"""Neural-network building blocks of the Janus model (all TorchScript-compatible)."""

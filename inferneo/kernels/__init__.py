"""Native kernels and their loaders."""

"""Text workloads: SST-2 with a multi-exit MiniLM."""

"""The per-GPU arbiter: gate policy and loop, memory reserve controller, their Prometheus metrics."""

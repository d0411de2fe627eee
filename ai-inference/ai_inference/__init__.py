"""Cornjacket's AI inference sidecar: per-device streaming anomaly scores for sensor readings."""

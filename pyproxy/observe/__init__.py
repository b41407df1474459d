"""Observability: the access log (metrics, anomaly detection and the dashboard come later)."""

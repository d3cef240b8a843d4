"""Admission webhooks: validation of our kinds, pods and workloads; stamping of new pods."""

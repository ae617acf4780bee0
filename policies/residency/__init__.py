"""Residency policies: where a preempted request's KV goes."""

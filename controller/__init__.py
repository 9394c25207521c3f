"""The fleet service: registry, rollout engine, telemetry, persistence, operator API.

Imports `shared` only; never `edge_agent` or `broker`.
"""

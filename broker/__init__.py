"""Broker assets, local service launchers and the `hotswap` command line.

This is the composition root: it runs mosquitto (and moto's S3 server for the
demo and tests) as local processes, and mounts the controller's and the edge
agent's commands under one `hotswap` entry point. Nothing in `controller` or
`edge_agent` imports it.
"""

"""The online classification core behind the Ray Serve app in `serve/`: request parsing and limits,
image fetching under an allowlist, admission control, shared forward passes and counters.

Imports the core and the registry; the Serve deployments themselves live in `serve/`.
"""

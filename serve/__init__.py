"""The Ray Serve application of sav-ray.

- `serve/app.py`: the deployments (ingress and classifier) and the HTTP API
- `serve/schemas.py`: the configuration (`args:` of config.yaml) and request/response models
- `serve/config.yaml`: for `serve run serve/config.yaml` and `serve deploy`
- `serve/client.py`: a standard-library client; `python -m serve.client` classifies a manifest
- `serve/local.py`: serve one artifact, classify a manifest over HTTP, stop (end of `make demo`)
"""

"""Build per-host preprovisioning boot images from PreprovisioningImage manifests.

The package is pure: network data and base images go in, rendered files, payloads, image
layouts and statuses come out. It imports neither ``kubernetes`` nor ``celery``, so the
command line, the workers and the tests all call the same code.
"""

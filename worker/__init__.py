"""Build workers: the Celery app, the ``ppimage.build`` task and the Kubernetes access it needs.

A worker reads a PreprovisioningImage and its Secret itself, builds and publishes the image with
``builder`` and patches the status subresource. Only object references cross the queue.
"""

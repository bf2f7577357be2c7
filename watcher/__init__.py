"""The watcher role: list and watch PreprovisioningImages and Secrets, enqueue builds.

The watcher sends only references (namespace, name, uid, token) to the build queues. Workers
read the objects themselves, so Secret contents never enter the broker.
"""

"""The image server: streams each published image as its base file with the payload spliced in.

``ppimage serve`` runs it. Replicas share only the payload store and the base image catalog. Each
keeps nothing but caches, so any number of them can serve the same URLs.
"""

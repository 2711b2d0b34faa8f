"""The jobstate service: the store, the watch hub and the gRPC layer that serves them.

Layers, from the inside out (each imports only the ones before it):
``errors`` and ``rules`` (the domain), ``hub`` (fan-out of changes), ``store`` (the truth),
``service`` (gRPC: the only module that knows status codes) and ``main`` (configuration and process).
"""

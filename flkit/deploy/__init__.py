"""Provisioning: one root CA per project, and a startup kit (certificate, key, CA) per participant.

``flkit provision`` writes the kits (:mod:`flkit.deploy.provision`); the server and the sites read
theirs with :func:`flkit.deploy.kit.load_kit`. The project file format is in
:mod:`flkit.deploy.project`. Nothing here imports torch or gRPC, and this package imports nothing
at all, so ``flkit --help`` stays cheap: the ``cryptography`` library loads only when a kit is
written or read.
"""

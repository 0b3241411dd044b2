"""PyTorch Lightning integration: ``import flkit_lightning as flare; flare.patch(trainer)``.

Empty until the Lightning issue lands; the package exists so the distribution layout is final.
"""

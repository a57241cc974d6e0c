"""Dedup stage: perceptual hashes of new photos, folded into near-duplicate clusters (entry: ``stage.run``)."""

"""Training, evaluation and prediction for the photo-to-product ensemble."""

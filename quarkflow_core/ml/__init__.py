"""Machine learning: model zoo, transforms, training, evaluation, calibration, comparison,
pruning, export and self-describing artifacts. Torch is imported only inside this package."""

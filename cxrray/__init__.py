"""cxrray: train, bulk-score and serve chest X-ray classifiers on Ray."""
__version__ = "0.1.0"

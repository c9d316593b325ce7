"""f2m-ray: Feature2Mass labeled breast-mass synthesis on Ray."""

__version__ = "0.3.0"

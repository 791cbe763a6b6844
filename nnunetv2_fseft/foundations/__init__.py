"""Foundations, read in one place whatever their source, into one description (`Foundation`).

    read_foundation(path) -> Foundation
        path: an nnU-Net model folder, an nnU-Net checkpoint (.pth), or an nnssl checkpoint (.pth).

Planning, loading, head and channel mapping and adapter files work on the description; a new source is one
new reader here."""
from .description import Foundation, weights_digest
from .reader import read_foundation

__all__ = ["Foundation", "read_foundation", "weights_digest"]

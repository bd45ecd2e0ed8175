"""The layers, one module per family; ``import fnn`` re-exports them all."""

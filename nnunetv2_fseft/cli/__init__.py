"""Console scripts: thin argparse fronts over the library (one module per command)."""

"""Studies behind fusedwd's design choices that are not benchmarks of fusedwd itself.

    python -m research.quant_codes      # the study that chose the 8-bit code (docs/quantization.md)

Not installed with the package (like bench/); run from the repository root.
"""

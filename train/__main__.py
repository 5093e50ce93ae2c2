"""``python -m train`` (and ``torchrun ... -m train``): the n2n-train command."""

from train.cli import main

main()

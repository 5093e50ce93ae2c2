"""``python -m n2n.train`` (and ``torchrun ... -m n2n.train``): the n2n-train command."""

from n2n.train.cli import main

main()

"""``python -m n2n.extract`` (and ``torchrun ... -m n2n.extract``): the n2n-extract command."""

from n2n.extract.cli import main

main()

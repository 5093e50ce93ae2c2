"""``python -m extract`` (and ``torchrun ... -m extract``): the n2n-extract command."""

from extract.cli import main

main()

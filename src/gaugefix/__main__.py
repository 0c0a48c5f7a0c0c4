"""``python -m gaugefix`` (and ``torchrun ... -m gaugefix``): the command-line interface."""

from .cli import main

main()

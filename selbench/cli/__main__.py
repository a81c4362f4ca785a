"""``python -m selbench.cli``: the command line, as torchrun and the tests start it."""

from selbench.cli import main

main()

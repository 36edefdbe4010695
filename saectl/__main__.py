"""`python -m saectl`: the CLI, as torchrun launches it (`torchrun ... -m saectl train ...`)."""

from saectl.cli import main

main()

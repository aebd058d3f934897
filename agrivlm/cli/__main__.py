"""``python -m agrivlm.cli``: the ``agrivlm`` command."""

from agrivlm.cli import main

main()

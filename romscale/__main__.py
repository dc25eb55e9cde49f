"""`python -m romscale ...` is the `romscale` command."""

from romscale.cli import main

main()

"""`python -m jaxrl_entropy.cli ...`: the console script without the installed entry point."""
import sys

from jaxrl_entropy.cli.main import main

sys.exit(main())

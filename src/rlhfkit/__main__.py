"""``python -m rlhfkit``: the ``rlhfkit`` command line."""
import sys

from rlhfkit.cli import main

sys.exit(main())

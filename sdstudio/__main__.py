"""`python -m sdstudio ...` (what `accelerate launch -m sdstudio train ...` runs)."""
import sys

from .cli import main

sys.exit(main())

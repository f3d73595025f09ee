"""``python -m capsmed`` runs the ``capsmed`` command."""

import sys

from capsmed.cli import main

sys.exit(main())

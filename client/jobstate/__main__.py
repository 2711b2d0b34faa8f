"""``python -m jobstate``: the same as the ``jobstate`` command."""

import sys

from jobstate.client.cli import main

sys.exit(main())

"""`python -m fedit.cli`: the same as the `fedit` command."""

import sys

from fedit.cli import main

sys.exit(main())

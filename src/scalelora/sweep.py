"""`python -m scalelora.sweep`: the command users and scripts type; the code is `scalelora.study.sweep`."""

import sys

from scalelora.study.sweep import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m scalelora.pipeline`: the command users and scripts type; the code is `scalelora.study.pipeline`."""

import sys

from scalelora.study.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

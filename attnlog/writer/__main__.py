"""`python -m attnlog.writer`: the writer process (see `attnlog.writer.child`)."""

import sys

from attnlog.writer.child import main

if __name__ == "__main__":
    sys.exit(main())

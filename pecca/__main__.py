import sys

from pecca.cli import main

sys.exit(main())

import sys

from occrt.cli import main

sys.exit(main())

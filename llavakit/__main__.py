import sys

from llavakit.cli import main

sys.exit(main())

import sys

from isal_backend.cli import main

sys.exit(main())

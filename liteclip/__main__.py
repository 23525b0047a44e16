import sys

from liteclip.cli import main

sys.exit(main())

"""`python -m liteclip.data download | check | prepare | shard ...`: the dataset tools of liteclip.cli."""

import sys

from liteclip.cli import main

sys.exit(main(["data", *sys.argv[1:]]))

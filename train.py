"""Train a CLIP model: `python train.py --config configs/demo.yaml [--set key=value ...] [--resume auto]`.

Also under torchrun for several GPUs or nodes: `torchrun --nproc_per_node 4 train.py --config configs/flickr8k.yaml`.
"""

import sys

from liteclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

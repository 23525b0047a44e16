"""What JPEG draft decoding (PIL's reduced-scale DCT decode) changes in what a pretrained tower sees, and what it saves.

liteclip indexes a photo library with JPEGs decoded at reduced scale, never smaller than the resize needs, and
evaluates (and predicts on a file) with JPEGs decoded whole, as the checkpoint's own library would. This measures,
on photos enlarged to camera sizes and saved as JPEG, the cosine between a pretrained timm tower's features of the
two decodes and the time each takes per photo (decode and transform, one process):

    python -m benchmarks.draft_decoding --images $R/flickr8k_raw/Images --count 200 \\
        --image-tower tf_efficientnet_lite0 \\
        --image-weights $R/weights/efficientnet-lite0/tf_efficientnet_lite0.timm.safetensors

Each photo is enlarged twice, to --size (default 4032x3024, a phone camera's): smoothly (bicubic) and with sharp
edges (nearest neighbour, whose fine detail a reduced decode blurs most); each is decoded whole and as drafts no
smaller than --margins times the side the resize needs. The copies are written under a temporary folder and
removed; the photos themselves are only read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (read only)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT the photos are enlarged to")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the enlarged copies")
    parser.add_argument("--image-tower", required=True, help="timm name, e.g. tf_efficientnet_lite0")
    parser.add_argument("--image-weights", type=Path, required=True)
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0],
                        help="drafts no smaller than MARGIN times the side the resize needs (1: as small as it can)")
    args = parser.parse_args(argv)

    import timm
    from PIL import Image
    from safetensors.torch import load_file

    from liteclip.data.images import load_image
    from liteclip.data.transforms import decode_side, eval_transform

    tower = timm.create_model(args.image_tower, pretrained=False, num_classes=0)
    state = {k: v for k, v in load_file(str(args.image_weights)).items() if not k.startswith("classifier.")}
    tower.load_state_dict(state)
    tower.eval()
    data_config = {**timm.data.resolve_model_data_config(tower), "resize_with": "pil"}
    transform, side = eval_transform(data_config), decode_side(data_config)
    width, height = (int(v) for v in args.size.lower().split("x"))
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    print(f"{len(photos)} photos from {args.images}, enlarged to {width}x{height}, JPEG quality {args.quality}; "
          f"{args.image_tower} at {data_config['input_size'][-1]} px, drafts no smaller than {side} px")

    with tempfile.TemporaryDirectory() as scratch:
        for name, resample in (("smooth (bicubic)", Image.Resampling.BICUBIC),
                               ("sharp (nearest)", Image.Resampling.NEAREST)):
            decodes = {"whole": None, **{f"draft x{margin:g}": int(side * margin) for margin in args.margins}}
            cosines = {decode: [] for decode in decodes if decode != "whole"}
            seconds = dict.fromkeys(decodes, 0.0)
            for photo in photos:
                copy = Path(scratch) / "copy.jpg"
                with Image.open(photo) as image:
                    image.convert("RGB").resize((width, height), resample).save(copy, quality=args.quality)
                pixels = {}
                for decode, min_size in decodes.items():
                    start = time.perf_counter()
                    pixels[decode] = transform(load_image(copy, min_size))
                    seconds[decode] += time.perf_counter() - start
                with torch.no_grad():
                    features = tower(torch.stack(list(pixels.values())))
                for row, decode in enumerate(decodes):
                    if decode != "whole":
                        cosines[decode].append(float(torch.nn.functional.cosine_similarity(
                            features[:1], features[row:row + 1])))
            for decode, values in cosines.items():
                values = np.array(values)
                print(f"{name}, {decode}: feature cosine, draft against whole decode: median "
                      f"{np.median(values):.5f}, 1st percentile {np.percentile(values, 1):.5f}, lowest "
                      f"{values.min():.5f}; {(values >= 0.999).mean():.1%} of photos at 0.999 or more. Decode and "
                      f"transform per photo: whole {1000 * seconds['whole'] / len(photos):.0f} ms, draft "
                      f"{1000 * seconds[decode] / len(photos):.0f} ms "
                      f"({seconds['whole'] / max(seconds[decode], 1e-9):.1f}x faster)")


if __name__ == "__main__":
    main()

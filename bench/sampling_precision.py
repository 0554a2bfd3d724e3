"""How far half-precision sampling lands from the float32 samples: ours (the network in bf16/fp16, x_t kept in
float32) against diffusers' DDPMPipeline with the same weights in that dtype (its x_t in the network's dtype too),
for the same generator and chain.

    python bench/sampling_precision.py                                   # tiny-16, random weights
    python bench/sampling_precision.py --pipeline runs/quickstart --images 4 --dtypes bf16   # ~10 min here

Prints, per dtype, the mean and the largest difference from the float32 samples in uint8 levels (float32: ours and
diffusers' give the same samples, see tests/test_pipeline.py).
"""

import argparse
import copy

import diffusers
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config
from ddpm_hf.images import to_pil, to_uint8
from ddpm_hf.pipelines import image_grid

CASTS = {"bf16": "bfloat16", "fp16": "half"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="a pipeline folder (default: tiny-16 with random weights)")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the reverse chain")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=list(CASTS), choices=list(CASTS))
    parser.add_argument("--grid", default=None, help="save the samples here: a row per pipeline, float32 first")
    args = parser.parse_args()

    if args.pipeline:
        reference = DDPMPipeline.from_pretrained(args.pipeline)
    else:
        torch.manual_seed(args.seed)
        reference = DDPMPipeline(unet=DDPMUNet(**unet_config("tiny-16")).eval(), scheduler=DDPMScheduler())

    def samples(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=args.images, generator=torch.Generator().manual_seed(args.seed),
                    num_inference_steps=args.steps, output_type="pt").images.float()

    full = samples(reference)
    rows = [full]
    print(f"{args.pipeline or 'tiny-16 (random weights)'}, {args.steps} steps, {args.images} images; difference "
          "from the float32 samples in uint8 levels (mean, largest):")
    for dtype in args.dtypes:
        cast = CASTS[dtype]
        ours = DDPMPipeline(unet=getattr(copy.deepcopy(reference.unet), cast)(), scheduler=reference.scheduler)
        theirs_unet = diffusers.UNet2DModel.from_config(reference.unet.config)
        theirs_unet.load_state_dict(reference.unet.state_dict())
        theirs = diffusers.DDPMPipeline(unet=getattr(theirs_unet.eval(), cast)(),
                                        scheduler=diffusers.DDPMScheduler.from_config(reference.scheduler.config))
        for name, pipe in (("ours (x_t in float32)", ours), (f"diffusers (x_t in {dtype})", theirs)):
            rows.append(samples(pipe))
            levels = (rows[-1] - full).abs() * 255
            print(f"  {dtype} {name}: {levels.mean():.2f}, {levels.max():.1f}")
    if args.grid:
        tiles = to_pil(to_uint8(torch.cat(rows) * 2 - 1))
        image_grid(tiles, rows=len(rows), cols=args.images).save(args.grid)
        print(f"grid: {args.grid} (rows: float32, then ours and diffusers' per dtype)")


if __name__ == "__main__":
    main()

"""Writes a full-size Stable Diffusion 1.5 checkpoint with seeded random weights, for load/convert measurements.

    python benchmarks/make_full_checkpoint.py /tmp/sd15-random.safetensors

The file has the original single-file (CompVis/LDM) layout and size of `v1-5-pruned-emaonly.safetensors`
(fp32, 4.3 GB), made from diffusers/transformers modules with the SD 1.5 configs (PyTorch needed here only).
"""

import argparse
import os
import sys

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import ldm_fixtures  # noqa: E402
from tests import reference as R  # noqa: E402
from tests.test_full_size import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output")
    args = parser.parse_args()
    unet = R.state_dict_numpy(R.make_unet(seed=10, **SD15_UNET))
    vae = R.state_dict_numpy(R.make_vae(seed=11, **SD15_VAE))
    text = R.state_dict_numpy(R.make_text_encoder(seed=12, **SD15_TEXT))
    ldm = ldm_fixtures.diffusers_to_ldm(unet, vae, text)
    del unet, vae, text
    save_file({k: np.ascontiguousarray(v) for k, v in ldm.items()}, args.output)
    print(f"wrote {args.output}: {len(ldm)} tensors, {os.path.getsize(args.output) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

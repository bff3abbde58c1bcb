"""`python -m benchmarks.loose_boxes drawn|object OUT`: the shapes bench's box and loose-box move
cases (50-case set, seed 1000), with the mask as drawn or replaced by the object found inside it
(`geometry.object_in_mask`), judged case by case (docs/lab-notebook.md, 2026-12-02)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dragonctl import api, geometry, inputs
from dragonctl.bench import quality, success


def object_masks(original):
    """`inputs.build_mask` returning, for move and resize, the object found inside the mask."""

    def build_mask(ls, m, fld, h, w, read=inputs.read_file):
        mask = original(ls, m, fld, h, w, read)
        if fld == "mask" and ls.spec.mode in ("move", "resize"):
            source = inputs.read_image(ls.resolve(ls.spec.image), ls.path, "image", read)[0]
            return geometry.object_in_mask(source, mask)
        return mask

    return build_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["drawn", "object"])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.variant == "object":
        inputs.build_mask = object_masks(inputs.build_mask)
    cases = [c for k, c in enumerate(quality.make_cases("move", 50)) if k % 4 in (1, 2)]
    opts = api.EditOptions(no_cache=True, metadata=False)
    session = api.Session(opts)
    ok = 0
    for case in cases:
        ls, inp = api.load(quality.write_case(case, args.out, "shapes"))
        rep = api.edit_one(session, ls, inp, api.output_path(ls, None, None), opts, None)
        m = quality.score(case, np.asarray(Image.open(rep.output).convert("RGB")))
        failed = success.verdict("move", m, case.source.shape[1])
        ok += not failed
        print(case.name, failed or "ok", f"area error {m['area_error']:.3f} IoU {m['iou']:.3f}")
    print(f"{args.variant}: {ok}/{len(cases)}")


if __name__ == "__main__":
    main()

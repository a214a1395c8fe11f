"""`osv bench fvd`: cost of the FVD/FID pipeline's two parts.

1. Feature extraction throughput (clips/s) of the chosen video backbone
   (eval.fvd_backbone, or --backbone) and frame backbone (eval.fid_backbone),
   on seeded random uint8 clips of data.frames x data.resolution (throughput does
   not depend on the content). The i3d backbone needs models/base/i3d/i3d_torchscript.pt.
2. Time of the Fréchet step (Gaussian fit + pytorch-fid distance) at 400-d (I3D)
   and 2048-d (Inception), on random features of --feature-clips rows.
Printed as a table; --out also writes JSON.
"""

from __future__ import annotations

import time

import numpy as np


def add_args(parser) -> None:
    if "--params" not in parser._option_string_actions:
        parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--backbone", choices=["i3d", "standin"], default=None,
                        help="video backbone (default eval.fvd_backbone)")
    parser.add_argument("--fid-backbone", choices=["inception", "standin"], default=None,
                        help="frame backbone (default eval.fid_backbone)")
    parser.add_argument("--base", default="models/base", help="folder holding i3d/i3d_torchscript.pt")
    parser.add_argument("--clips", type=int, default=16, help="clips fed to each extractor")
    parser.add_argument("--batch", type=int, default=None, help="clips per batch (default eval.batch_size)")
    parser.add_argument("--feature-clips", type=int, default=2048,
                        help="rows of the random features for the Fréchet timing")
    parser.add_argument("--dims", default="400,2048", help="feature sizes of the Fréchet timing")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")


def _throughput(extractor, clips: np.ndarray, batch: int, frames: bool) -> float:
    extractor(clips[:1].reshape(-1, *clips.shape[2:]) if frames else clips[:1])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        part = clips[i:i + batch]
        extractor(part.reshape(-1, *part.shape[2:]) if frames else part)
    return len(clips) / (time.perf_counter() - start)


def _frechet_seconds(dim: int, rows: int, seed: int = 0) -> float:
    from osv.eval.frechet import frechet_from_features

    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((rows, dim)), rng.standard_normal((rows, dim)) + 0.1
    start = time.perf_counter()
    frechet_from_features(a, b)
    return time.perf_counter() - start


def run(args) -> dict:
    import copy
    import json

    import torch

    from osv.atomic import write_json
    from osv.eval.features import frame_extractor, video_extractor
    from osv.params import load_params

    params = copy.deepcopy(load_params(args.params))
    ev = params["eval"]
    ev["fvd_backbone"] = args.backbone or ev["fvd_backbone"]
    ev["fid_backbone"] = args.fid_backbone or ev["fid_backbone"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = params["data"]
    shape = (args.clips, data["frames"], data["resolution"]["height"], data["resolution"]["width"], 3)
    clips = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    batch = args.batch or ev["batch_size"]
    rows = []
    for kind, ext in (("video", video_extractor(params, args.base, device)), ("frame", frame_extractor(params, device, args.base))):
        rows.append(dict(part=f"{kind} features", backbone=ext.name, value=_throughput(ext, clips, batch,
                                                                                        kind == "frame"),
                         unit="clips/s"))
    for dim in (int(d) for d in args.dims.split(",")):
        rows.append(dict(part=f"Fréchet step, {dim}-d", backbone=f"{args.feature_clips} x 2 rows",
                         value=_frechet_seconds(dim, args.feature_clips), unit="s"))
    info = dict(device=device, clip_shape=list(shape[1:]), batch=batch, threads=torch.get_num_threads())
    print(f"osv bench fvd: {json.dumps(info)}")
    print(f"{'part':<24} {'value':>10} {'unit':<8} backbone")
    for r in rows:
        print(f"{r['part']:<24} {r['value']:>10.3f} {r['unit']:<8} {r['backbone']}")
    result = dict(info=info, rows=rows)
    if args.out:
        write_json(args.out, result)
    return result

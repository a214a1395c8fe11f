"""`osv data`: build data/clips from the embedded media or from OpenVid-1M (data.source).

OpenVid fans out: one job per part of data.openvid.parts (`--part N`: download, check and
extract it, then its receipt data/parts/openvid-N.json beside data/clips), then the split over
every part (`--gather`). Without either flag, every part is submitted at once, then the split.
Each is a job of resources.data through the launcher (a submit host never probes 65K videos).
The embedded source has no parts: `--gather` and the plain command both build it.
"""

from __future__ import annotations

import json
from pathlib import Path


def receipt_path(out: str | Path, part: int) -> Path:
    """data/parts/openvid-N.json for --out data/clips."""
    return Path(out).with_name("parts") / f"openvid-{part}.json"


def prepare(params: dict, out: str) -> None:
    """The split (OpenVid: from the parts, fetching any not fetched yet) or the embedded clips."""
    if params["data"]["source"] == "openvid":
        from osv.data import openvid

        openvid.prepare(params, out)
        return
    from osv.data import embedded

    report = embedded.build(params, out)
    print(f"osv data: {out}: {json.dumps(report['counts'])} clips; skipped {len(report['skipped'])} sources")


def command(args) -> int:
    from osv.launch import run_stage, run_stages
    from osv.params import load_params

    params = load_params(args.params)
    openvid = params["data"]["source"] == "openvid"
    if args.part is not None:
        parts = params["data"]["openvid"]["parts"]
        if not openvid or args.part not in parts:
            raise SystemExit(f"osv data: --part {args.part}: not an OpenVid part of data.openvid.parts {parts}"
                             + ("" if openvid else " (data.source is not openvid)"))
    if openvid:
        from osv.data.openvid import fetch_part

        calls = [dict(params=params, n=n, receipt=str(receipt_path(args.out, n)))
                 for n in ([args.part] if args.part is not None else params["data"]["openvid"]["parts"])]
        if args.part is not None or not args.gather:
            run_stages("data", fetch_part, calls, params)
        if args.part is not None:
            return 0
    run_stage("data", prepare, dict(params=params, out=args.out), params)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="cut train/test clips (mp4) and write manifest.csv")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", default="data/clips", help="output folder (default: %(default)s)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--part", type=int, default=None,
                     help="OpenVid only: fetch and extract part N of data.openvid.parts, write data/parts/openvid-N.json "
                          "(default: every part, then the split)")
    how.add_argument("--gather", action="store_true",
                     help="only the split, from the parts already fetched (embedded: the whole stage)")
    p.set_defaults(func=command)

"""`osv data`: build data/clips from the embedded media or from OpenVid-1M (data.source)."""

from __future__ import annotations

import json


def prepare(params: dict, out: str) -> None:
    if params["data"]["source"] == "openvid":
        from osv.data import openvid

        openvid.prepare(params, out)
        return
    from osv.data import embedded

    report = embedded.build(params, out)
    print(f"osv data: {out}: {json.dumps(report['counts'])} clips; skipped {len(report['skipped'])} sources")


def _command(args) -> int:
    from osv.params import load_params

    params = load_params(args.params)
    prepare(params, args.out)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="cut train/test clips (mp4) and write manifest.csv")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="data/clips")
    p.set_defaults(func=_command)

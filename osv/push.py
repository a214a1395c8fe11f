"""`osv push`: upload an exported run, models/RUN, to a Hugging Face hub model repository.

The card is rewritten with the metrics that exist now (the export ran before evaluation) in a
staging folder of hard links, so models/RUN (a DVC output) stays as `osv train` wrote it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def metrics_of_run(params: dict, run: str, metrics: Path) -> list[Path]:
    """metrics/train/RUN.json, then metrics/eval/M.json of each method M sampling this run."""
    methods = [m for m, spec in params["eval"]["methods"].items() if spec.get("model") == run]
    return [metrics / "train" / f"{run}.json", *(metrics / "eval" / f"{m}.json" for m in methods)]


def push(folder, params: dict, repo_id: str, metrics: Path = Path("metrics"), endpoint: str | None = None,
         revision: str = "main", private: bool = False) -> str:
    """Create the repo (if needed) and upload `folder` with a fresh card; returns the commit id."""
    from huggingface_hub import HfApi

    from osv.hub import endpoint_url, link_or_copy
    from osv.train.export import write_model_card

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder}: no model_index.json; not a pipeline export (rerun `osv train`)")
    run = folder.name
    api = HfApi(endpoint=endpoint_url(endpoint))
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".push-{run}-") as tmp:
        for f in folder.rglob("*"):
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts):
                link_or_copy(f, Path(tmp) / f.relative_to(folder))
        (Path(tmp) / "README.md").unlink(missing_ok=True)  # a hard link: rewriting it would edit models/RUN
        write_model_card(tmp, params, metrics_of_run(params, run, metrics), repo_id=repo_id)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=f"osv push {run}")
    print(f"[osv push] {folder} -> {api.endpoint}/{repo_id}@{revision} ({info.oid})")
    return info.oid


def register(subparsers) -> None:
    p = subparsers.add_parser("push", help="upload models/RUN (pipeline, card) to a Hugging Face hub repo")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--run", required=True, help="a run of train.runs (its export models/RUN)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the model repository (created if missing)")
    p.add_argument("--models", default="models", help="folder of the exports (default: %(default)s)")
    p.add_argument("--metrics", default="metrics", help="metrics folder for the card (default: %(default)s)")
    p.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--revision", default="main", help="branch to push to (default: %(default)s)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from osv.params import load_params

    params = load_params(args.params, run=args.run)
    push(Path(args.models) / args.run, params, args.repo_id, Path(args.metrics), args.endpoint, args.revision,
         args.private)
    return 0

"""Resumable, verified downloads from a Hugging Face hub (or a plain URL) through huggingface_hub.

Why not `hf_hub_download`: in huggingface_hub 2.4 it writes to a process-unique
temporary file and deletes it when the download fails (huggingface_hub PR 4228),
so an interrupted 50 GB OpenVid part would restart from zero. Here the partial
file stays as `<file>.incomplete` in a download cache and huggingface_hub's
`http_get` resumes it with a Range request (it also retries a dropped connection
within one run). Every finished file is checked against the size and SHA-256
(git SHA-1 for small non-LFS files) that the hub reports through
`HfApi.get_paths_info`/`list_repo_tree` before it is renamed into place.

Cache: $OSV_DOWNLOAD_DIR, else $HF_HOME/osv-downloads (default ~/.cache/huggingface).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 * 1024 * 1024


class DownloadError(RuntimeError):
    """A download that could not be completed or did not match what the server advertised."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repository as the hub describes it."""

    path: str
    size: int
    sha256: str | None  # LFS files: SHA-256 of the content
    git_sha1: str | None  # non-LFS files: git blob id of the content

    @classmethod
    def from_repo_file(cls, f) -> RemoteFile:
        lfs = getattr(f, "lfs", None)
        return cls(path=f.path, size=int(f.size), sha256=lfs.sha256 if lfs else None,
                   git_sha1=None if lfs else f.blob_id)


def endpoint_url(endpoint: str | None) -> str:
    """params endpoint, else $HF_ENDPOINT (read now, not at import), else huggingface.co."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def download_root() -> Path:
    if os.environ.get("OSV_DOWNLOAD_DIR"):
        return Path(os.environ["OSV_DOWNLOAD_DIR"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "osv-downloads"


def repo_cache(repo_type: str, repo_id: str, commit: str) -> Path:
    return download_root() / f"{repo_type}s" / repo_id / commit


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_sha1_file(path: str | os.PathLike) -> str:
    """git's blob id: sha1 of 'blob <size>\\0' + content (what the hub reports for non-LFS files)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_commit(repo_id: str, repo_type: str, revision: str, endpoint: str | None, probe_path: str) -> str:
    """The commit a revision (branch, tag or commit) points to, read from a HEAD of one file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, probe_path, repo_type=repo_type, revision=revision, endpoint=endpoint_url(endpoint))
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint_url(endpoint))
    except Exception as exc:
        raise DownloadError(f"{repo_type} {repo_id}@{revision}: cannot read {probe_path} ({url}): {exc}"
                            f"{access_hint(exc, repo_type, repo_id, endpoint)}") from exc
    commit = meta.commit_hash
    if not commit or len(commit) != 40:
        raise DownloadError(f"{url}: the server sent no X-Repo-Commit header, so it is not a Hugging Face hub endpoint")
    if len(revision) == 40 and commit != revision:
        raise DownloadError(f"{repo_type} {repo_id}: asked for commit {revision} but the hub served {commit}")
    return commit


def access_hint(exc: Exception, repo_type: str, repo_id: str, endpoint: str | None) -> str:
    """What to do when the hub refuses a repository (gated, e.g. SVD img2vid, or private): '' otherwise.

    huggingface_hub sends the token of $HF_TOKEN, else the one `hf auth login` stored in
    $HF_HOME/token (HF_TOKEN_PATH); we pass none explicitly, so that is the token used.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if not isinstance(exc, GatedRepoError) and not (isinstance(exc, HfHubHTTPError) and status in (401, 403)):
        return ""
    page = f"{endpoint_url(endpoint)}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
    token = ("no token was found (neither $HF_TOKEN nor a stored login)" if get_token() is None
             else "the token in use has no access to it")
    return (f"\n{repo_type} {repo_id} refused access (HTTP {status}): {token}. It is probably a gated "
            f"repository: while logged in, accept its licence on {page}, create a read token "
            f"(Settings > Access Tokens), then `hf auth login` (older huggingface_hub: `huggingface-cli login`) "
            f"or `export HF_TOKEN=hf_...` in the environment of `osv weights`.")


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint_url(endpoint))


def list_files(repo_id: str, repo_type: str, commit: str, endpoint: str | None,
               patterns: list[str] | None = None, recursive: bool = True) -> list[RemoteFile]:
    """Files of the repository at `commit` (root only unless recursive), optionally fnmatch-filtered."""
    from huggingface_hub.hf_api import RepoFile

    entries = _api(endpoint).list_repo_tree(repo_id, recursive=recursive, revision=commit, repo_type=repo_type)
    files = [RemoteFile.from_repo_file(e) for e in entries if isinstance(e, RepoFile)]
    if patterns is not None:
        files = [f for f in files if any(fnmatch.fnmatchcase(f.path, p) for p in patterns)]
    return sorted(files, key=lambda f: f.path)


def paths_info(repo_id: str, repo_type: str, commit: str, endpoint: str | None, paths: list[str]) -> dict[str, RemoteFile]:
    """Size and hashes of the given files; a missing path is an error naming it."""
    from huggingface_hub.hf_api import RepoFile

    infos = _api(endpoint).get_paths_info(repo_id, paths, revision=commit, repo_type=repo_type)
    found = {i.path: RemoteFile.from_repo_file(i) for i in infos if isinstance(i, RepoFile)}
    missing = [p for p in paths if p not in found]
    if missing:
        raise DownloadError(f"{repo_type} {repo_id}@{commit}: no such file(s): {', '.join(missing)}")
    return found


def _resume_get(url: str, partial: Path, expected_size: int | None, headers: dict) -> None:
    """Append the rest of `url` to `partial` (huggingface_hub's http_get sends the Range header)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    partial.parent.mkdir(parents=True, exist_ok=True)
    resume = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and resume > expected_size:
        partial.unlink()  # longer than the file: not a prefix of it
        resume = 0
    if expected_size is not None and resume == expected_size:
        return  # complete; the caller verifies it
    # expected_size is not passed on: a server sending another size than the hub reported
    # then fails our own check with a clear message (and the bad file is removed).
    try:
        with open(partial, "ab") as f:
            http_get(url, f, resume_size=resume, headers=headers,
                     displayed_filename=partial.name.removesuffix(".incomplete"))
    except HfHubHTTPError as exc:
        if resume and exc.response is not None and exc.response.status_code == 416:
            partial.unlink()  # the server cannot continue this prefix: start over once
            with open(partial, "ab") as f:
                http_get(url, f, headers=headers)
        else:
            raise


def _verify(path: Path, remote: RemoteFile, where: str) -> str:
    """Check size and hash; return the SHA-256 of the content."""
    size = path.stat().st_size
    if size != remote.size:
        raise DownloadError(f"{where}: size mismatch: the hub reports {remote.size} bytes, got {size}")
    digest = sha256_file(path)
    if remote.sha256 is not None and digest != remote.sha256:
        raise DownloadError(f"{where}: sha256 mismatch: expected {remote.sha256}, got {digest}")
    if remote.sha256 is None and remote.git_sha1 is not None:
        got = git_sha1_file(path)
        if got != remote.git_sha1:
            raise DownloadError(f"{where}: git blob sha1 mismatch: expected {remote.git_sha1}, got {got}")
    return digest


def fetch_file(repo_id: str, repo_type: str, commit: str, endpoint: str | None, remote: RemoteFile) -> tuple[Path, str]:
    """Download one repository file into the cache (resuming), verify it; return (path, sha256)."""
    from filelock import FileLock
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    dest = repo_cache(repo_type, repo_id, commit) / remote.path
    where = f"{repo_type} {repo_id}@{commit}:{remote.path}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        digest_file = Path(str(dest) + ".sha256")
        if dest.exists() and digest_file.exists() and dest.stat().st_size == remote.size:
            return dest, digest_file.read_text().strip()  # verified when it was renamed into place
        if dest.exists():  # renamed but its digest was never written: check it again
            digest = _verify(dest, remote, where)
            digest_file.write_text(digest + "\n")
            return dest, digest
        partial = Path(str(dest) + ".incomplete")
        url = hf_hub_url(repo_id, remote.path, repo_type=repo_type, revision=commit, endpoint=endpoint_url(endpoint))
        _resume_get(url, partial, remote.size, build_hf_headers())
        try:
            digest = _verify(partial, remote, where)
        except DownloadError as exc:
            partial.unlink(missing_ok=True)  # corrupt content: never resume from it
            raise DownloadError(f"{exc}; removed the download, refusing the file") from exc
        os.replace(partial, dest)
        digest_file.write_text(digest + "\n")
    return dest, digest


def fetch_url(url: str, name: str, sha256: str | None = None, sha256_prefix: str | None = None) -> tuple[Path, str]:
    """Download a plain URL into the cache (resuming); return (path, sha256).

    `sha256`: the expected SHA-256; `sha256_prefix`: the expected start of it (torch hub's
    convention of naming a file `<name>-<first hex digits of its SHA-256>.<ext>`). A file
    that fails either check is deleted from the cache and refused; no token is sent.
    """
    from filelock import FileLock

    dest = download_root() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not dest.exists():
            partial = Path(str(dest) + ".incomplete")
            _resume_get(url, partial, None, {})
            os.replace(partial, dest)
        digest = sha256_file(dest)
        if sha256 is not None and digest != sha256:
            dest.unlink()
            raise DownloadError(f"{url} ({name}): sha256 mismatch: expected {sha256}, got {digest}; "
                                "removed the download")
        if sha256_prefix is not None and not digest.startswith(sha256_prefix):
            dest.unlink()
            raise DownloadError(f"{url} ({name}): sha256 mismatch: expected a hash starting with {sha256_prefix} "
                                f"(from the file name), got {digest}; removed the download")
    return dest, digest


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard link (no extra disk, no dependency on the cache staying put), else copy."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)

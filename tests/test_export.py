"""The diffusers-native export (#15): models/RUN loads with one from_pretrained call, samples what
`osv generate` samples for the same seed, carries a model card and round-trips through a hub."""

import base64
import json
import re
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
import yaml
from hubserver import HubServer, Repo, _make_handler
from test_train import make_workspace, tiny_params

from osv.conditioning import from_batch
from osv.eval.generate import generate
from osv.latents import LatentDataset
from osv.pipeline import OSVPipeline
from osv.video import read_frames

RUN = "stage2"  # eval.methods osv_1 and osv_tts sample it


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """models/stage2 exported from the small teacher plus a random (non-zero) LoRA."""
    from osv.dependencies import fingerprint
    from osv.models import load_unet
    from osv.student import make_student
    from osv.train.export import export_run

    root = tmp_path_factory.mktemp("export")
    params = tiny_params({"eval": {"num_clips": 1, "batch_size": 1}})
    ws = make_workspace(root, params)
    st = params["student"]
    student = make_student(load_unet(ws["teacher"]), st["lora_rank"], st["lora_targets"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a zero LoRA would make the student the teacher
    info = {"run": RUN, "stage": "acd", "init": "stage1", "step": 3, "params_sha256": fingerprint(params, "train", RUN)}
    folder = export_run(root / "models" / RUN, student, {}, None, params, info)
    return params, ws, folder, root


def test_export_is_a_diffusers_pipeline_folder_with_a_card(export):
    from diffusers import DiffusionPipeline

    params, ws, folder, _ = export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["osv_pipeline", "OSVPipeline"] and index["sampler"]["sampler"] == "tts"
    for part in ("vae", "image_encoder"):  # hard links, not copies: the export stays small
        name = next(p.name for p in (folder / part).glob("*.safetensors"))
        assert (folder / part / name).stat().st_ino == (ws["teacher"] / part / name).stat().st_ino
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "OSVPipeline" and pipe.settings["steps"] == 1
    card = (folder / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: diffusers" in meta and "pipeline_tag: image-to-video" in meta and "base_model" not in meta
    assert "NOT SVD" in card and "NFE 2" in card and "metrics/train/stage2.json" in card
    assert f'"lora_rank": {params["student"]["lora_rank"]}' in card and '"stage": "acd"' in card  # training params
    assert re.search(r"params fingerprint .*`[0-9a-f]{64}`", card) and "git commit" in card


def test_card_of_hub_weights_names_svd_and_its_licence(export):
    from osv.train.export import card_metadata

    params = tiny_params()
    params["weights"] = {**params["weights"], "source": "hub"}
    meta = card_metadata(params)
    assert meta["base_model"] == params["weights"]["teacher"]["repo_id"] and meta["license"] == "other"
    assert meta["license_name"] == "stable-video-diffusion-community"


def sample_like_generate(pipe, params, latents, method) -> np.ndarray:
    """Clip 0 as osv generate samples it: stored conditioning, batch 0's seed."""
    res = params["data"]["resolution"]
    item = LatentDataset(latents, "test", res["width"], res["height"])[0]
    spec = params["eval"]["methods"][method]
    out = pipe(cond=from_batch(item, params), seed=params["eval"]["seed"] * 100_003 + 0, sampler=spec["sampler"],
               steps=spec["steps"])
    return out.frames


@pytest.mark.parametrize("method", ["osv_tts", "osv_1"])
def test_one_line_load_samples_what_generate_samples(export, method):
    params, ws, folder, root = export
    out = root / "samples" / method
    generate(params, method, str(ws["teacher"]), str(folder), str(ws["latents"]), str(out))
    pipe = OSVPipeline.from_pretrained(folder)
    frames = sample_like_generate(pipe, params, ws["latents"], method)
    pipe.save_mp4(frames, root / f"{method}.mp4")  # generate keeps mp4s only: the same encoder on the same frames
    assert np.array_equal(read_frames(root / f"{method}.mp4")[0], read_frames(out / "clip-0000.mp4")[0])


class UploadHub(HubServer):
    """HubServer plus the routes upload_folder and snapshot_download use: create repo, preupload
    (every file "regular": base64 in the commit), commit (NDJSON) and repo info."""

    def __enter__(self):
        hub, base = self, _make_handler(self)

        class Handler(base):
            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                if self.path == "/api/validate-yaml":  # the hub checks the card's metadata before a commit
                    hub.validated = json.loads(self._body())["content"]
                    return self._json({"warnings": []})
                if self.path == "/api/repos/create":
                    body = json.loads(self._body())
                    repo_id = f"{body['organization']}/{body['name']}"
                    hub.repos.setdefault(("model", repo_id), Repo("model", repo_id, {}))
                    return self._json({"url": f"{hub.endpoint}/{repo_id}"})
                if m := re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/main$", self.path):
                    repo, body = hub.repos[("model", m.group(1))], self._body()
                    if m.group(2) == "preupload":
                        files = json.loads(body)["files"]
                        return self._json({"files": [{"path": f["path"], "uploadMode": "regular",
                                                      "shouldIgnore": False} for f in files]})
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            repo.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    repo.commit = format(len(hub.log), "040x")
                    return self._json({"commitUrl": f"{hub.endpoint}/{m.group(1)}/commit/{repo.commit}",
                                       "commitOid": repo.commit})
                return super().do_POST()

            def do_GET(self):
                if m := re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/?]+)", self.path):
                    repo = hub.find("model", m.group(1), m.group(2))
                    return self._json({"id": repo.id, "sha": repo.commit,
                                       "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
                return super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self


def test_push_then_load_from_the_hub_samples_the_same(export, hub_env, monkeypatch):
    from huggingface_hub import snapshot_download

    from osv.push import push

    params, ws, folder, root = export
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    card = (folder / "README.md").read_text()
    (root / "metrics" / "train").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "train" / f"{RUN}.json").write_text(json.dumps({"final": {"loss_distance": 0.25}}))
    with UploadHub() as hub:
        push(folder, params, "osv/stage2", root / "metrics", endpoint=hub.endpoint)
        local = snapshot_download("osv/stage2", endpoint=hub.endpoint)
        one_line = OSVPipeline.from_pretrained("osv/stage2", endpoint=hub.endpoint)  # the hub's one-line load
    assert (folder / "README.md").read_text() == card  # models/RUN (a DVC output) untouched
    pushed = open(f"{local}/README.md").read()
    assert yaml.safe_load(hub.validated.split("---")[1])["pipeline_tag"] == "image-to-video"
    assert "| final.loss_distance | 0.25 |" in pushed and 'from_pretrained("osv/stage2")' in pushed
    want = sample_like_generate(OSVPipeline.from_pretrained(folder), params, ws["latents"], "osv_tts")
    got = sample_like_generate(OSVPipeline.from_pretrained(local), params, ws["latents"], "osv_tts")
    assert np.array_equal(got, want)
    assert np.array_equal(sample_like_generate(one_line, params, ws["latents"], "osv_tts"), want)


def test_a_folder_with_foreign_pipeline_code_is_refused(export, tmp_path):
    import shutil

    _, _, folder, _ = export
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "osv_pipeline.py").write_text("import os\nos.system('echo hi')\n")
    with pytest.raises(ValueError, match="not the osv shim"):
        OSVPipeline.from_pretrained(copy)

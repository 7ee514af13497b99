"""Hugging Face Hub ids, as vLLM takes them (paged_jax/model/hub.py), with no network: the tests
lay out the hub's own cache in a temporary directory (content-addressed blobs, a snapshot of
links to them per commit, refs naming commits) and run offline, or talk to a Hub faked inside
the process for the errors only the Hub can give."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import httpx
import httpx2
import huggingface_hub
import pytest
from hf_checkpoints import save_tokenizer
from huggingface_hub import constants
from server_process import running_server
from serving import generate_ids, make_llm, random_prompts

from paged_jax import LLM
from paged_jax.engine_args import EngineArgs
from paged_jax.model import hub
from paged_jax.server import serve
from paged_jax.tokenizer import Tokenizer

ID = "org/tiny-llama"
MAIN = "a" * 40  # what refs/main names: the tiny llama with its tokenizer and chat template
V2 = "b" * 40  # what the tag v2 names: a tokenizer only


def put_in_cache(files: Path, cache: Path, repo_id: str, commit: str, ref: str) -> Path:
    """files as huggingface_hub stores a download of repo_id at `ref`; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in files.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(llama_with_tokenizer, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model")
    shutil.copytree(llama_with_tokenizer, model, dirs_exist_ok=True)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    cache = tmp_path_factory.mktemp("hub_cache")
    put_in_cache(model, cache, ID, MAIN, "main")
    put_in_cache(save_tokenizer(tmp_path_factory.mktemp("tokenizer")), cache, ID, V2, "v2")
    return cache


def snapshot(cache: Path, commit: str) -> str:
    return str(cache / "models--org--tiny-llama" / "snapshots" / commit)


@pytest.fixture
def offline(cache, monkeypatch):
    """HF_HUB_CACHE=cache HF_HUB_OFFLINE=1, as this process sees them: huggingface_hub reads its
    environment once, at import, into huggingface_hub.constants."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_answers(monkeypatch):
    """hub_answers(status, X-Error-Code): every request to the Hub gets that answer."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def answer(status: int, error_code: str) -> None:
        reply = httpx2.MockTransport(lambda request: httpx2.Response(status, headers={"X-Error-Code": error_code}))
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=reply))

    yield answer
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_a_hub_id_generates_what_its_local_directory_generates(offline, cache, llama_with_tokenizer, rng):
    prompts = random_prompts(rng, [5, 9])
    from_hub = make_llm(ID)
    assert from_hub.engine.args.model == snapshot(cache, MAIN)
    assert from_hub.get_tokenizer() is not None
    assert generate_ids(from_hub, prompts) == generate_ids(make_llm(llama_with_tokenizer), prompts)


def test_a_local_directory_is_used_as_it_is(offline, llama_with_tokenizer):
    assert hub.resolve(EngineArgs(str(llama_with_tokenizer), revision="v2")).model == str(llama_with_tokenizer)


def test_a_revision_is_a_branch_tag_or_commit(offline, cache):
    assert hub.local_dir(ID) == hub.local_dir(ID, "main") == snapshot(cache, MAIN)
    assert hub.local_dir(ID, "v2") == hub.local_dir(ID, V2) == snapshot(cache, V2)


def test_the_tokenizer_is_taken_at_its_revision_else_at_the_models(offline, cache, llama_with_tokenizer):
    args = EngineArgs(str(llama_with_tokenizer), tokenizer=ID, revision="v2")
    assert hub.resolve(args).tokenizer == snapshot(cache, V2)
    args = EngineArgs(str(llama_with_tokenizer), tokenizer=ID, revision="v2", tokenizer_revision="main")
    assert hub.resolve(args).tokenizer == snapshot(cache, MAIN)


def test_download_dir_is_the_cache_in_place_of_the_hubs(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve(EngineArgs(ID, download_dir=str(cache))).model == snapshot(cache, MAIN)
    with pytest.raises(FileNotFoundError, match=f"'{ID}' .* cache at {tmp_path}"):
        hub.resolve(EngineArgs(ID))


def test_an_offline_miss_names_the_id_the_revision_and_what_to_do(offline):
    with pytest.raises(FileNotFoundError, match="'org/missing' is neither .* unset HF_HUB_OFFLINE"):
        LLM("org/missing")
    with pytest.raises(FileNotFoundError, match=f"'{ID}' at revision 'v3' is neither"):
        LLM(ID, revision="v3")


def test_what_is_neither_a_directory_nor_an_id_is_named(offline):
    with pytest.raises(ValueError, match="'/no/such/checkpoint' is neither a local directory nor a Hugging Face"):
        LLM("/no/such/checkpoint")


@pytest.mark.parametrize("status, error_code, says", [
    (404, "RepoNotFound", "'org/private' at revision 'v9' is neither a local directory nor a model on the Hugging"),
    (403, "GatedRepo", "'org/private' at revision 'v9' is gated .* HF_TOKEN"),
    (404, "RevisionNotFound", "'org/private' has no revision 'v9'"),
])
def test_what_the_hub_refuses_is_named(hub_answers, tmp_path, status, error_code, says):
    hub_answers(status, error_code)
    with pytest.raises(ValueError, match=says):
        hub.local_dir("org/private", revision="v9", download_dir=str(tmp_path))


def test_serve_takes_vllms_hub_flags(tmp_path):
    flags = ["--revision", "v2", "--tokenizer", "org/tok", "--tokenizer-revision", "t1", "--download-dir", "d"]
    args = serve.engine_args(serve.make_parser().parse_args([ID, *flags]), ID)
    assert (args.revision, args.tokenizer, args.tokenizer_revision, args.download_dir) == ("v2", "org/tok", "t1", "d")


def test_serve_names_what_it_cannot_find_and_exits_2(offline, capsys):
    assert serve.main(["org/missing", "--revision", "v1"]) == 2
    assert "'org/missing' at revision 'v1' is neither" in capsys.readouterr().err


def test_the_server_reads_the_hubs_environment_and_names_the_model_as_given(cache, llama_with_tokenizer, tmp_path):
    args = [ID, "--uvicorn-log-level", "warning", "--no-warm-up", "--attention-backend", "xla",
            "--max-model-len", "64", "--num-gpu-blocks-override", "64", "--block-size", "4"]
    environment = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    with running_server(args, tmp_path / "server.log", env=environment) as url:
        [model] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        chat = httpx.post(f"{url}/tokenize", timeout=30, json={"messages": [{"role": "user", "content": "a dog"}]})
    assert (model["id"], model["root"]) == (ID, ID)
    tokenizer = Tokenizer.from_pretrained(llama_with_tokenizer)  # and the snapshot's template renders "a dog "
    assert chat.json()["tokens"] == tokenizer.encode("a dog ", add_special_tokens=False)

"""stvit_core.hub, hub_access and model_card in-process: model card, results files, token handling, xet switch,
and the loopback server's HTTP details (resolve headers, Range, auth). End-to-end CLI runs are in test_hub_cli.py."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
import urllib.error
import urllib.request

import huggingface_hub
import huggingface_hub.lfs
import pytest
import yaml
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file

from stvit_core.errors import CheckpointError, DownloadError, InvalidArgumentError
from stvit_core.hub import pull_from_hub, push_to_hub
from stvit_core.hub_access import HubError, disable_xet_unless_huggingface, scrub
from stvit_core.model_card import find_extra_files, read_eval_results, render_model_card

from . import conftest
from .hub_fixtures import ALICE_TOKEN, BAD_TOKEN, BOB_TOKEN, REPO_ROOT, hub_env, make_tiny_model


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def test_model_card_front_matter_and_body(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", metadata={
        "source_model": "deit_small_patch16_224.fb_in1k", "num_semantic_tokens": 16, "params_m": 22.05,
        "gflops": 1.91, "base_gflops": 4.6, "base_params_m": 22.05, "speedup": 2.05})
    (model_dir / "results.json").write_text(json.dumps({"top1": 79.8, "top5": 94.9}))
    card = render_model_card(model_dir, "alice/stvit-deit-small")

    meta = front_matter(card)
    assert meta["library_name"] == "timm"
    assert meta["tags"] == ["image-classification", "timm", "stvit"]
    assert meta["base_model"] == "timm/deit_small_patch16_224.fb_in1k"
    assert meta["datasets"] == ["imagenet-1k"]
    assert isinstance(meta["license"], str)
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [("Top-1 accuracy", 79.8), ("Top-5 accuracy", 94.9)]

    body = card[card.index("\n---\n", 4):]
    assert "| Semantic tokens | 16 |" in body
    assert "22.05M" in body and "| 1.91 |" in body and "| 4.60 |" in body
    assert "2.41x fewer FLOPs" in body and "2.05x measured throughput" in body
    assert "import stvit_core" in body and 'timm.create_model("hf-hub:alice/stvit-deit-small"' in body
    assert "Making Vision Transformers Efficient from A Token Sparsification View" in body and "CVPR" in body
    assert not re.search(r"\$\{?[a-z_]+", card), "unfilled template placeholder"


def test_model_card_without_results_has_no_model_index(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", metadata={"source_model": "hf-hub:someone/deit-x@v2"})
    meta = front_matter(render_model_card(model_dir, "alice/plain"))
    assert "model-index" not in meta
    assert meta["base_model"] == "someone/deit-x"
    body = render_model_card(model_dir, "alice/plain")
    assert "No evaluation results" in body
    params = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
    assert f"| Parameters | {params / 1e6:.2f}M" in body  # counted from the weights: no params_m in metadata


def test_eval_results_from_a_timm_validate_csv(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    (model_dir / "results-imagenet.csv").write_text(
        "model,top1,top1_err,top5,top5_err,param_count,img_size\nstvit,79.812,20.188,94.95,5.05,22.05,224\n")
    assert read_eval_results(model_dir) == {"top1": 79.812, "top5": 94.95, "dataset": None,
                                            "file": "results-imagenet.csv"}


def test_extra_files_are_results_and_training_config_only(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    for name in ("results.json", "eval_imagenet.json", "args.yaml", "metrics.csv", "checkpoint-3.pth", "notes.txt"):
        (model_dir / name).write_text("x")
    assert [p.name for p in find_extra_files(model_dir)] == [
        "args.yaml", "eval_imagenet.json", "metrics.csv", "results.json"]


def test_scrub_removes_tokens():
    assert scrub(f"401 for token {ALICE_TOKEN}!", ALICE_TOKEN) == "401 for token ***!"
    assert "hf_***" in scrub("header was Bearer hf_abcdefGHIJ123456")


def test_xet_is_disabled_for_self_hosted_endpoints(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    disable_xet_unless_huggingface("https://huggingface.co")
    assert constants.HF_HUB_DISABLE_XET is False and "HF_HUB_DISABLE_XET" not in os.environ
    disable_xet_unless_huggingface("http://127.0.0.1:8080")
    assert constants.HF_HUB_DISABLE_XET is True and os.environ["HF_HUB_DISABLE_XET"] == "1"


def test_cli_push_to_a_self_hosted_hub_works_without_disabling_xet_by_hand(hub_server, tmp_path):
    """hf-xet is installed and would be used for uploads; stvit turns it off for any endpoint but huggingface.co,
    in the process that pushes (huggingface_hub's settings read from an environment without
    HF_HUB_DISABLE_XET), so the plain LFS protocol reaches the self-hosted server."""
    env = hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN)
    del env["HF_HUB_DISABLE_XET"]
    proc = conftest.run_cli("push-to-hub", make_tiny_model(tmp_path / "m"), "alice/no-xet", "--json", env=env,
                            exact_env=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["repo_id"] == "alice/no-xet"
    assert hub_server.state.lfs_batches, "the weights went through the Git-LFS batch API"
    assert importlib.util.find_spec("hf_xet") is not None, "without hf-xet this test proves nothing"


def test_card_of_a_fine_tuned_model(tmp_path):
    """A directory as `stvit finetune` exports best/: convert's metadata kept in config.json (plus `finetuned`),
    the final evaluation in results.json."""
    model_dir = make_tiny_model(tmp_path / "best", metadata={
        "source_model": "deit_tiny_patch16_224.fb_in1k", "source_weights": "timm/deit_tiny_patch16_224.fb_in1k",
        "architecture": "stvit_deit_tiny_patch16_224", "num_semantic_tokens": 4, "semantic_tokens_per_window": None,
        "params_m": 0.33, "base_params_m": 0.33, "gflops": 0.0125, "base_gflops": 0.0281, "input_size": [3, 32, 32],
        "finetuned": {"dataset": "fashion-mnist", "epochs": 10}})
    (model_dir / "results.json").write_text(json.dumps(
        {"dataset": "fashion-mnist", "top1": 84.6, "top5": 99.4, "num_images": 500, "split": "val"}))
    card = render_model_card(model_dir, "me/stvit-fm")
    meta = front_matter(card)
    assert meta["base_model"] == "timm/deit_tiny_patch16_224.fb_in1k"
    assert meta["datasets"] == ["fashion-mnist"]
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "fashion-mnist", "type": "fashion-mnist", "split": "val"}
    assert [(m["name"], m["value"]) for m in result["metrics"]] == [("Top-1 accuracy", 84.6), ("Top-5 accuracy", 99.4)]
    body = card[card.index("\n---\n", 4):]
    assert "converted from `deit_tiny_patch16_224.fb_in1k` and fine-tuned on `fashion-mnist`" in body
    assert "| 0.01 |" in body and "| 0.03 |" in body and "2.25x fewer FLOPs" in body
    assert "Top-1 84.60%, top-5 99.40% on fashion-mnist (val split, 500 images)" in body
    assert "n/a" not in body.split("## Evaluation")[0].replace("| Semantic tokens | 4 |", "")


def test_card_of_a_model_from_random_weights_names_no_base_model(tmp_path):
    """`stvit demo` and `convert --no-pretrained` start from random weights: no Hub model is their base."""
    model_dir = make_tiny_model(tmp_path / "m", metadata={"source_model": "deit_tiny_patch16_224",
                                                          "source_weights": "random"})
    meta = front_matter(render_model_card(model_dir, "me/random"))
    assert "base_model" not in meta
    local = make_tiny_model(tmp_path / "l", metadata={"source_model": "deit_tiny_patch16_224 (demo width 64, 32 px)"})
    assert "base_model" not in front_matter(render_model_card(local, "me/local"))


def test_a_token_written_into_a_results_file_is_never_uploaded(hub_server, tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    (model_dir / "args.yaml").write_text(f"hub_token: {ALICE_TOKEN}\n")
    with pytest.raises(HubError, match="args.yaml contains the Hub token") as err:
        push_to_hub(model_dir, "alice/leaky", token=ALICE_TOKEN, endpoint=hub_server.url)
    assert ALICE_TOKEN not in str(err.value)
    assert hub_server.state.commits_received == []


def test_pulling_a_repo_that_is_not_a_model_leaves_no_output(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url, token=ALICE_TOKEN)
    api.create_repo("alice/text-only")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="alice/text-only")
    with pytest.raises(CheckpointError, match="not a timm model repo"):
        pull_from_hub("alice/text-only", output_dir=tmp_path / "out", endpoint=hub_server.url, token=ALICE_TOKEN)
    assert not (tmp_path / "out").exists()
    assert not any(tmp_path.iterdir())  # no temporary directory left behind either

    # The rest of the server's repo API, through the real client.
    [info] = api.get_paths_info("alice/text-only", ["notes.txt", "missing.txt"])
    assert (info.path, info.size, info.lfs) == ("notes.txt", 5, None)
    api.create_branch("alice/text-only", branch="v1")
    assert {b.name for b in api.list_repo_refs("alice/text-only").branches} == {"main", "v1"}
    api.delete_repo("alice/text-only")
    assert not api.repo_exists("alice/text-only")


# --- the loopback server itself --------------------------------------------------------------------------
def http(method, url, token=None, headers=None):
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_resolve_headers_range_and_auth(hub_server, tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    result = push_to_hub(model_dir, "alice/served", token=ALICE_TOKEN, endpoint=hub_server.url, private=True)
    weights = (model_dir / "model.safetensors").read_bytes()
    url = f"{hub_server.url}/alice/served/resolve/main/model.safetensors"

    status, headers, body = http("HEAD", url, ALICE_TOKEN)
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == result.commit_oid
    assert int(headers["X-Linked-Size"]) == int(headers["Content-Length"]) == len(weights)
    assert headers["X-Linked-Etag"].strip('"') == hashlib.sha256(weights).hexdigest()

    status, headers, body = http("GET", url, ALICE_TOKEN, {"Range": "bytes=8-27"})
    assert status == 206 and body == weights[8:28]
    assert headers["Content-Range"] == f"bytes 8-27/{len(weights)}"
    status, _, body = http("GET", url, ALICE_TOKEN, {"Range": f"bytes={len(weights) - 5}-"})
    assert status == 206 and body == weights[-5:]

    config = f"{hub_server.url}/alice/served/resolve/{result.commit_oid}/config.json"
    status, headers, body = http("GET", config, ALICE_TOKEN)
    assert status == 200 and body == (model_dir / "config.json").read_bytes()
    assert headers["ETag"].strip('"') == hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()

    assert http("GET", url)[0] == 401  # private: no token
    status, headers, _ = http("GET", url, BOB_TOKEN)  # private: another user
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = http("GET", url, BAD_TOKEN)
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    status, headers, _ = http("GET", url.replace("/main/", "/nope/"), ALICE_TOKEN)
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = http("HEAD", url.replace("model.safetensors", "missing.bin"), ALICE_TOKEN)
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"


def test_library_errors_are_one_line_and_scrubbed(hub_server, tmp_path, monkeypatch):
    with pytest.raises(HubError, match=r"authentication failed \(HTTP 401\)") as err:
        pull_from_hub("alice/x", output_dir=tmp_path / "o", token=BAD_TOKEN, endpoint=hub_server.url)
    assert BAD_TOKEN not in str(err.value) and "\n" not in str(err.value)
    model_dir = make_tiny_model(tmp_path / "m")
    with pytest.raises(InvalidArgumentError, match="Repo id must"):
        push_to_hub(model_dir, "not a repo id!", token=ALICE_TOKEN, endpoint=hub_server.url)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no saved login
    with pytest.raises(HubError, match="needs a Hugging Face token"):
        push_to_hub(model_dir, "alice/x", endpoint=hub_server.url)
    assert hub_server.state.repos == {}


def test_upload_dropped_until_retries_run_out_is_a_clear_error(hub_server, tmp_path, monkeypatch):
    # huggingface_hub retries 5 times over ~23 s; keep its logic but with 1 retry and short waits.
    fast = functools.partial(huggingface_hub.lfs.http_backoff, max_retries=1, base_wait_time=0.05)
    monkeypatch.setattr(huggingface_hub.lfs, "http_backoff", fast)
    hub_server.state.drop_uploads = 100
    with pytest.raises(HubError, match="connection .* was dropped and retries did not help") as err:
        push_to_hub(make_tiny_model(tmp_path / "m"), "alice/flaky", token=ALICE_TOKEN, endpoint=hub_server.url)
    assert "\n" not in str(err.value) and ALICE_TOKEN not in str(err.value)
    assert hub_server.state.drop_uploads == 98  # the first try and one retry
    assert len(hub_server.state.commits_received) == 0  # nothing half-committed


def test_pull_offline_or_unreachable_takes_the_cached_snapshot(hub_server, tmp_path, monkeypatch):
    """The cache is what `hf-hub:` loads use offline; pull uses it too, also into --output, and says so."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # not the user's cache
    model_dir = make_tiny_model(tmp_path / "m")
    pushed = push_to_hub(model_dir, "alice/offline", token=ALICE_TOKEN, endpoint=hub_server.url)
    online = pull_from_hub("alice/offline", endpoint=hub_server.url)
    assert not online.from_cache and online.commit_oid == pushed.commit_oid

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub_server.state.requests)
    copy = pull_from_hub("alice/offline", output_dir=tmp_path / "out", endpoint=hub_server.url)
    assert copy.from_cache and copy.commit_oid == pushed.commit_oid
    assert not (tmp_path / "out" / "model.safetensors").is_symlink()  # the files, not links into the cache
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert len(hub_server.state.requests) == requests_before
    with pytest.raises(DownloadError, match=r"alice/offline@v2: offline mode is on .* not in the local cache"):
        pull_from_hub("alice/offline", revision="v2", endpoint=hub_server.url)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cached = pull_from_hub("alice/offline", endpoint=dead)
    assert cached.from_cache and cached.path == online.path and cached.commit_oid == pushed.commit_oid
    with pytest.raises(DownloadError, match=f"cannot connect to {dead}, the Hub is unreachable"):
        pull_from_hub("alice/elsewhere", endpoint=dead)


def test_a_refused_revision_name_gives_the_servers_reason(hub_server, tmp_path):
    """huggingface_hub's own first line for a 400 is a bare "Bad request:"; the server's text follows it."""
    with pytest.raises(HubError, match=r"push failed: the Hub refused the request \(HTTP 400\): "
                                       r"Invalid branch name bad rev name\.\.$"):
        push_to_hub(make_tiny_model(tmp_path / "m"), "alice/revs", token=ALICE_TOKEN, endpoint=hub_server.url,
                    revision="bad rev name..")
    assert hub_server.state.commits_received == []

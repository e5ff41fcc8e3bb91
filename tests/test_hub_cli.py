"""``stvit push-to-hub`` / ``stvit pull`` end to end: the real CLI in subprocesses, the real huggingface_hub
client, real HTTP to the loopback Hub server of tests/hub_server.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_fixtures import ALICE_TOKEN, BAD_TOKEN, BOB_TOKEN, hub_env, make_tiny_model, run_cli, run_python

TOKENS = (ALICE_TOKEN, BOB_TOKEN, BAD_TOKEN)


def assert_clean(proc) -> None:
    """No token and no traceback, whatever happened."""
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text
        for token in TOKENS:
            assert token not in text


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert_clean(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def logits_of(model_dir_or_model, x: torch.Tensor) -> torch.Tensor:
    from stvit_core import load_model

    model = load_model(model_dir_or_model) if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model
    with torch.no_grad():
        return model.eval()(x)


TIMM_HF_HUB_LOGITS = """
import sys, torch, timm
import stvit_core  # registers the STViT architectures
model = timm.create_model(sys.argv[1] if len(sys.argv) > 1 else {spec!r}, pretrained=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    torch.save(model(torch.randn(2, 3, 32, 32)), {out!r})
"""


def test_push_pull_roundtrip_identical(hub_server, tiny_model_dir, tmp_path):
    """convert -> push -> pull into a fresh HF_HOME -> identical tensors and logits, also via timm hf-hub:."""
    model_dir = tmp_path / "model"
    make_tiny_model(model_dir)
    (model_dir / "results.json").write_text(json.dumps({"top1": 71.25, "top5": 90.5, "dataset": "imagenet-1k"}))
    (model_dir / "args.yaml").write_text("epochs: 30\nlr: 0.0005\n")
    (model_dir / "notes.txt").write_text("not uploaded")

    push = run_cli(["push-to-hub", str(model_dir), "alice/stvit-tiny", "--json"],
                   hub_env(hub_server.url, tmp_path / "home-push", ALICE_TOKEN))
    assert push.returncode == 0, push.stderr
    assert_clean(push)
    result = json.loads(push.stdout)
    assert result["repo_id"] == "alice/stvit-tiny" and result["unchanged"] is False
    assert result["files"] == ["README.md", "args.yaml", "config.json", "model.safetensors", "results.json"]
    commit = result["commit_oid"]

    # A second identical push succeeds without a new commit.
    again = run_cli(["push-to-hub", str(model_dir), "alice/stvit-tiny", "--json"],
                    hub_env(hub_server.url, tmp_path / "home-push", ALICE_TOKEN))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["commit_oid"] == commit
    assert json.loads(again.stdout)["unchanged"] is True
    assert len(hub_server.state.commits_received) == 1

    # Pull anonymously (public repo) into a fresh HF_HOME; the files land in the HF cache.
    home = tmp_path / "home-pull"
    pull = run_cli(["pull", "alice/stvit-tiny", "--json"], hub_env(hub_server.url, home))
    assert pull.returncode == 0, pull.stderr
    assert_clean(pull)
    pulled = json.loads(pull.stdout)
    path = Path(pulled["path"])
    assert path.is_relative_to(home) and pulled["commit_oid"] == commit
    assert pulled["architecture"] == "vit_tiny_patch16_224"
    assert {"README.md", "config.json", "model.safetensors", "results.json", "args.yaml"} <= set(pulled["files"])
    assert (path / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    original, downloaded = load_file(model_dir / "model.safetensors"), load_file(path / "model.safetensors")
    assert original.keys() == downloaded.keys()
    assert all(torch.equal(original[k], downloaded[k]) for k in original)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    expected = logits_of(model_dir, x)
    assert torch.equal(logits_of(str(path), x), expected)

    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "71.25" in card and "hf-hub:alice/stvit-tiny" in card

    # timm itself, in a fresh process that only knows HF_ENDPOINT, builds the same model.
    out = tmp_path / "timm_logits.pt"
    proc = run_python(TIMM_HF_HUB_LOGITS.format(spec="hf-hub:alice/stvit-tiny", out=str(out)),
                      hub_env(hub_server.url, tmp_path / "home-timm"))
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(out), expected)


def test_push_to_branch_and_pull_that_revision(hub_server, tiny_model_dir, tmp_path):
    env = hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN)
    on_main = run_cli(["push-to-hub", str(tiny_model_dir), "alice/branchy", "-q"], env)
    assert on_main.returncode == 0, on_main.stderr
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    on_dev = run_cli(["push-to-hub", str(other), "alice/branchy", "--revision", "dev", "--json",
                      "--commit-message", "seed 1 on dev"], env)
    assert on_dev.returncode == 0, on_dev.stderr
    assert json.loads(on_dev.stdout)["revision"] == "dev"
    repo = hub_server.state.repos["alice/branchy"]
    assert set(repo.branches) == {"main", "dev"} and repo.branches["main"] != repo.branches["dev"]
    assert repo.commits[repo.branches["dev"]].title == "seed 1 on dev"

    pull = run_cli(["pull", "alice/branchy", "--revision", "dev", "--output", str(tmp_path / "dev"), "--json"],
                   hub_env(hub_server.url, tmp_path / "fresh"))
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout)["commit_oid"] == repo.branches["dev"]
    dev_weights, seed1 = load_file(tmp_path / "dev" / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(dev_weights[k], seed1[k]) for k in seed1)

    # hf-hub:REPO@REVISION through stvit_core.load_model (timm's hf_split) picks the branch too.
    out = tmp_path / "dev_logits.pt"
    code = TIMM_HF_HUB_LOGITS.format(spec="", out=str(out)).replace(
        "timm.create_model(sys.argv[1] if len(sys.argv) > 1 else '', pretrained=True)",
        "stvit_core.load_model('hf-hub:alice/branchy@dev')")
    proc = run_python(code, hub_env(hub_server.url, tmp_path / "home-timm"))
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(0)
    assert torch.equal(torch.load(out), logits_of(other, torch.randn(2, 3, 32, 32)))


def test_private_repo_is_invisible_without_a_token(hub_server, tiny_model_dir, tmp_path):
    push = run_cli(["push-to-hub", str(tiny_model_dir), "alice/secret", "--private", "--json"],
                   hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
    assert push.returncode == 0, push.stderr
    assert json.loads(push.stdout)["private"] is True
    anonymous = run_cli(["pull", "alice/secret"], hub_env(hub_server.url, tmp_path / "anon"))
    assert_one_line_error(anonymous, "alice/secret", "not found")
    other_user = run_cli(["pull", "alice/secret"], hub_env(hub_server.url, tmp_path / "bob", BOB_TOKEN))
    assert_one_line_error(other_user, "not found", "404")
    owner = run_cli(["pull", "alice/secret", "--token", ALICE_TOKEN, "-o", str(tmp_path / "mine")],
                    hub_env(hub_server.url, tmp_path / "owner"))
    assert owner.returncode == 0, owner.stderr
    assert_clean(owner)
    assert (tmp_path / "mine" / "model.safetensors").is_file()


@pytest.mark.slow
def test_file_over_10mb_goes_through_lfs_and_dropped_upload_is_retried(hub_server, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model(model_dir)
    big = b"step,loss,top1\n" + b"".join(b"%d,%.6f,%.4f\n" % (i, 1 / (i + 1), i % 100) for i in range(700_000))
    assert len(big) > 10 * 1024 * 1024
    (model_dir / "metrics.csv").write_bytes(big)
    hub_server.state.drop_uploads = 1  # the first LFS upload is cut off without an answer

    push = run_cli(["push-to-hub", str(model_dir), "alice/big", "--json"],
                   hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
    assert push.returncode == 0, push.stderr
    assert_clean(push)
    batch_sizes = {obj["size"] for batch in hub_server.state.lfs_batches for obj in batch["objects"]}
    assert len(big) in batch_sizes
    lfs_lines = [line["value"] for line in hub_server.state.commits_received[0] if line["key"] == "lfsFile"]
    assert {v["path"] for v in lfs_lines} == {"metrics.csv", "model.safetensors"}
    assert hub_server.state.drop_uploads == 0
    uploads = [r for r in hub_server.state.requests if r[0] == "PUT" and r[1].startswith("/lfs-upload/")]
    assert len(uploads) == 3  # two files, one of them twice

    pull = run_cli(["pull", "alice/big", "-o", str(tmp_path / "out"), "-q"], hub_env(hub_server.url, tmp_path / "h2"))
    assert pull.returncode == 0, pull.stderr
    assert (tmp_path / "out" / "metrics.csv").read_bytes() == big


def test_create_pr_leaves_main_alone(hub_server, tiny_model_dir, tmp_path):
    env = hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN)
    assert run_cli(["push-to-hub", str(tiny_model_dir), "stvit-org/shared", "-q"], env).returncode == 0
    main_before = hub_server.state.repos["stvit-org/shared"].branches["main"]
    other = make_tiny_model(tmp_path / "seed2", seed=2)
    pr = run_cli(["push-to-hub", str(other), "stvit-org/shared", "--create-pr", "--json"], env)
    assert pr.returncode == 0, pr.stderr
    result = json.loads(pr.stdout)
    assert result["pr_url"].endswith("/stvit-org/shared/discussions/1")
    repo = hub_server.state.repos["stvit-org/shared"]
    assert repo.branches["main"] == main_before and repo.pulls[1] == result["commit_oid"]


# --- failures: one line, non-zero exit, no traceback, no token ------------------------------------------
def test_bad_token_is_a_401(hub_server, tiny_model_dir, tmp_path):
    proc = run_cli(["push-to-hub", str(tiny_model_dir), "alice/x", "--token", BAD_TOKEN],
                   hub_env(hub_server.url, tmp_path / "home"))
    assert_one_line_error(proc, "401", "token")


def test_push_to_someone_elses_namespace_is_refused(hub_server, tiny_model_dir, tmp_path):
    proc = run_cli(["push-to-hub", str(tiny_model_dir), "alice/x"], hub_env(hub_server.url, tmp_path / "h", BOB_TOKEN))
    assert_one_line_error(proc, "403")


def test_missing_repo_and_missing_revision_are_404(hub_server, tiny_model_dir, tmp_path):
    missing = run_cli(["pull", "alice/nope"], hub_env(hub_server.url, tmp_path / "h1", ALICE_TOKEN))
    assert_one_line_error(missing, "alice/nope", "not found", "404")
    assert run_cli(["push-to-hub", str(tiny_model_dir), "alice/here", "-q"],
                   hub_env(hub_server.url, tmp_path / "h2", ALICE_TOKEN)).returncode == 0
    no_rev = run_cli(["pull", "alice/here@v9", "-o", str(tmp_path / "out")], hub_env(hub_server.url, tmp_path / "h3"))
    assert_one_line_error(no_rev, "revision 'v9' not found", "404")
    assert not (tmp_path / "out").exists()


def test_server_down_is_connection_refused(tiny_model_dir, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    pull = run_cli(["pull", "alice/x"], hub_env(url, tmp_path / "h"))
    assert_one_line_error(pull, "cannot connect", url)
    push = run_cli(["push-to-hub", str(tiny_model_dir), "alice/x"], hub_env(url, tmp_path / "h", ALICE_TOKEN))
    assert_one_line_error(push, "cannot connect", url)


def test_pushing_a_directory_that_is_not_a_model(hub_server, tmp_path):
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    proc = run_cli(["push-to-hub", str(not_a_model), "alice/x"], hub_env(hub_server.url, tmp_path / "h", ALICE_TOKEN))
    assert_one_line_error(proc, "not a model directory", "config.json")
    assert hub_server.state.repos == {}  # refused before anything was created

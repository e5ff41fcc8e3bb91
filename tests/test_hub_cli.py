"""``stvit push-to-hub`` / ``stvit pull`` end to end: the real CLI (in this process, and one round trip in real
processes), the real huggingface_hub client, real HTTP to the loopback Hub server of tests/hub_server.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from . import conftest
from .hub_fixtures import ALICE_TOKEN, BAD_TOKEN, BOB_TOKEN, REPO_ROOT, hub_env, make_tiny_model, run_python

TOKENS = (ALICE_TOKEN, BOB_TOKEN, BAD_TOKEN)


def run_cli(args, env, fresh_process=False):
    """``stvit ARGS`` with exactly the environment ``env`` (HF_ENDPOINT, HF_HOME, HF_TOKEN...), in this process
    unless ``fresh_process``: huggingface_hub's settings are read from ``env`` as a new process would."""
    return conftest.run_cli(*args, env=env, exact_env=True, cwd=REPO_ROOT, timeout=180, fresh_process=fresh_process)


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


def push_in_process(server, model_dir, repo_id, token=ALICE_TOKEN, **kwargs):
    """Set-up pushes that are not what a test is about run in-process (explicit endpoint), to save time."""
    from stvit_core.hub import push_to_hub

    return push_to_hub(model_dir, repo_id, token=token, endpoint=server.url, **kwargs)


def pull_in_process(server, repo_id, output, token=None, **kwargs):
    from stvit_core.hub import pull_from_hub

    return pull_from_hub(repo_id, output_dir=output, token=token, endpoint=server.url, **kwargs)


TIMM_HF_HUB_LOGITS = """
import torch, timm
import stvit_core  # registers the STViT architectures
torch.manual_seed(0)
x = torch.randn(2, 3, 32, 32)
logits = {{}}
for spec in {specs!r}:
    with torch.no_grad():
        logits[spec] = timm.create_model(spec, pretrained=True).eval()(x)
torch.save(logits, {out!r})
"""


@pytest.mark.slow
def test_push_pull_roundtrip_identical(hub_server, tiny_model_dir, tmp_path):
    """convert -> push -> pull into a fresh HF_HOME -> identical tensors and logits."""
    model_dir = tmp_path / "model"
    convert = run_cli(["convert", "deit_tiny", "--no-pretrained", "--img-size", "32", "--num-classes", "10",
                       "--tokens", "4", "--output", str(model_dir)], hub_env(hub_server.url, tmp_path / "home-push"))
    assert convert.returncode == 0, convert.stderr
    (model_dir / "results.json").write_text(json.dumps({"top1": 71.25, "top5": 90.5, "dataset": "imagenet-1k"}))
    (model_dir / "args.yaml").write_text("epochs: 30\nlr: 0.0005\n")
    (model_dir / "notes.txt").write_text("not uploaded")

    push = run_cli(["push-to-hub", str(model_dir), "alice/stvit-tiny", "--json"],
                   hub_env(hub_server.url, tmp_path / "home-push", ALICE_TOKEN), fresh_process=True)
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
    assert "No files have been modified" not in again.stderr  # huggingface_hub's log line: we report it
    assert len(hub_server.state.commits_received) == 1

    # Pull anonymously (public repo) into a fresh HF_HOME; the files land in the HF cache.
    home = tmp_path / "home-pull"
    pull = run_cli(["pull", "alice/stvit-tiny", "--json"], hub_env(hub_server.url, home), fresh_process=True)
    assert pull.returncode == 0, pull.stderr
    assert_clean(pull)
    pulled = json.loads(pull.stdout)
    path = Path(pulled["path"])
    assert path.is_relative_to(home) and pulled["commit_oid"] == commit
    assert pulled["architecture"] == "stvit_deit_tiny_patch16_224"
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
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm" and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 71.25
    assert "hf-hub:alice/stvit-tiny" in card and "| Semantic tokens | 4 |" in card
    # converted with --no-pretrained: random weights have no base model on the Hub
    assert "base_model" not in meta and "(randomly initialised)" in card


@pytest.mark.slow
def test_push_to_branch_and_pull_that_revision(hub_server, tiny_model_dir, tmp_path):
    push_in_process(hub_server, tiny_model_dir, "alice/branchy")
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    on_dev = run_cli(["push-to-hub", str(other), "alice/branchy", "--revision", "dev", "--json",
                      "--commit-message", "seed 1 on dev"], hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
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

    # timm itself, in a fresh process that only knows HF_ENDPOINT, builds the same models from
    # hf-hub:REPO (main) and hf-hub:REPO@dev (timm's hf_split).
    expected = {"hf-hub:alice/branchy": tiny_model_dir, "hf-hub:alice/branchy@dev": other}
    out = tmp_path / "logits.pt"
    proc = run_python(TIMM_HF_HUB_LOGITS.format(specs=list(expected), out=str(out)),
                      hub_env(hub_server.url, tmp_path / "home-timm"))
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    logits = torch.load(out)
    for spec, model_dir in expected.items():
        assert torch.equal(logits[spec], logits_of(model_dir, x)), spec
    assert not torch.equal(logits["hf-hub:alice/branchy"], logits["hf-hub:alice/branchy@dev"])


@pytest.mark.slow
def test_private_repo_is_invisible_without_a_token(hub_server, tiny_model_dir, tmp_path):
    push = run_cli(["push-to-hub", str(tiny_model_dir), "alice/secret", "--private", "--json"],
                   hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
    assert push.returncode == 0, push.stderr
    assert json.loads(push.stdout)["private"] is True
    anonymous = run_cli(["pull", "alice/secret"], hub_env(hub_server.url, tmp_path / "anon"))
    assert_one_line_error(anonymous, "alice/secret", "not found")
    from stvit_core.hub import HubError

    with pytest.raises(HubError, match="alice/secret not found .*HTTP 404") as err:
        pull_in_process(hub_server, "alice/secret", tmp_path / "bob", token=BOB_TOKEN)
    assert BOB_TOKEN not in str(err.value)
    pull_in_process(hub_server, "alice/secret", tmp_path / "mine", token=ALICE_TOKEN)
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

    pull_in_process(hub_server, "alice/big", tmp_path / "out")
    assert (tmp_path / "out" / "metrics.csv").read_bytes() == big


def test_create_pr_with_the_saved_login(hub_server, tiny_model_dir, tmp_path):
    env = hub_env(hub_server.url, tmp_path / "home")  # no HF_TOKEN: the token saved by `hf auth login`
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text(ALICE_TOKEN)
    push_in_process(hub_server, tiny_model_dir, "stvit-org/shared")
    main_before = hub_server.state.repos["stvit-org/shared"].branches["main"]
    other = make_tiny_model(tmp_path / "seed2", seed=2)
    pr = run_cli(["push-to-hub", str(other), "stvit-org/shared", "--create-pr", "--json"], env)
    assert pr.returncode == 0, pr.stderr
    assert_clean(pr)
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


@pytest.mark.slow
def test_missing_repo_and_missing_revision_are_404(hub_server, tiny_model_dir, tmp_path):
    missing = run_cli(["pull", "alice/nope"], hub_env(hub_server.url, tmp_path / "h1", ALICE_TOKEN))
    assert_one_line_error(missing, "alice/nope", "not found", "404")
    push_in_process(hub_server, tiny_model_dir, "alice/here")
    no_rev = run_cli(["pull", "alice/here@v9", "-o", str(tmp_path / "out")], hub_env(hub_server.url, tmp_path / "h3"))
    assert_one_line_error(no_rev, "revision 'v9' not found", "404")
    assert not (tmp_path / "out").exists()


def test_server_down_is_connection_refused(tiny_model_dir, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    pull = run_cli(["pull", "alice/x"], hub_env(url, tmp_path / "h"))
    assert_one_line_error(pull, "cannot connect", url)
    from stvit_core.hub import HubError, push_to_hub

    with pytest.raises(HubError, match=f"push failed: cannot connect to {url}"):
        push_to_hub(tiny_model_dir, "alice/x", token=ALICE_TOKEN, endpoint=url)


def test_pushing_a_directory_that_is_not_a_model(hub_server, tmp_path):
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    proc = run_cli(["push-to-hub", str(not_a_model), "alice/x"], hub_env(hub_server.url, tmp_path / "h", ALICE_TOKEN))
    assert_one_line_error(proc, "not a model directory", "config.json")
    assert hub_server.state.repos == {}  # refused before anything was created


@pytest.mark.slow
def test_other_commands_take_hf_hub_specs_with_a_revision(hub_server, tiny_model_dir, tmp_path):
    """`stvit benchmark hf-hub:REPO@REV` against a self-hosted endpoint (HF_ENDPOINT only)."""
    push_in_process(hub_server, tiny_model_dir, "alice/bench", revision="dev")
    proc = run_cli(["benchmark", "hf-hub:alice/bench@dev", "--rounds", "1", "--round-time", "0.05", "-b", "2",
                    "--threads", "1", "--json"], hub_env(hub_server.url, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["stvit_model"] == "stvit_deit_tiny_patch16_224" and result["tokens"] == 4
    assert ("GET", "/alice/bench/resolve/dev/config.json") in hub_server.state.requests


# --- offline pulls, refused pushes, no-op pushes ---------------------------------------------------------
def test_pull_offline_uses_the_cache_and_checks_the_repo_id_first(hub_server, tiny_model_dir, tmp_path):
    """HF_HUB_OFFLINE=1: a model pulled before comes from the HF_HOME cache (as `hf-hub:` loads do), without
    asking the Hub; one that is not cached, or a malformed repo id, is a one-line error."""
    push_in_process(hub_server, tiny_model_dir, "alice/cached")
    online = run_cli(["pull", "alice/cached", "--json"], hub_env(hub_server.url, tmp_path / "home"))
    assert online.returncode == 0, online.stderr
    first = json.loads(online.stdout)
    assert first["from_cache"] is False

    offline_env = {**hub_env(hub_server.url, tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    requests_before = len(hub_server.state.requests)
    offline = run_cli(["pull", "alice/cached"], offline_env)
    assert offline.returncode == 0, offline.stderr
    assert offline.stderr == ""
    assert f"Pulled alice/cached@main (commit {first['commit_oid'][:12]}) from the local cache (offline) " \
           f"to {first['path']}" in offline.stdout
    assert "loads OK" in offline.stdout
    assert len(hub_server.state.requests) == requests_before  # the Hub was not asked

    not_cached = run_cli(["pull", "alice/cached@dev"], offline_env)
    assert_one_line_error(not_cached, "alice/cached@dev", "offline mode is on", "not in the local cache")
    bad_id = run_cli(["pull", "bad id"], offline_env)
    assert bad_id.returncode == 2
    assert_one_line_error(bad_id, "invalid repo id", "'bad id'")


def test_pushing_a_model_that_does_not_load_uploads_nothing(hub_server, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "truncated"
    make_tiny_model(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli(["push-to-hub", str(model_dir), "alice/broken"], hub_env(hub_server.url, tmp_path / "h", ALICE_TOKEN))
    assert_one_line_error(proc, "refusing to push, the model does not load", str(model_dir))
    assert hub_server.state.repos == {} and hub_server.state.commits_received == []


def test_create_pr_with_nothing_changed_says_so_and_opens_no_pr(hub_server, tiny_model_dir, tmp_path):
    """huggingface_hub skips the commit (and so the pull request) and logs that on stderr; stvit reports it
    as unchanged instead, in one message."""
    push_in_process(hub_server, tiny_model_dir, "alice/same")
    main_before = hub_server.state.repos["alice/same"].branches["main"]
    env = hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN)

    as_json = run_cli(["push-to-hub", str(tiny_model_dir), "alice/same", "--create-pr", "--json"], env)
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == ""  # not huggingface_hub's "No files have been modified since last commit..."
    result = json.loads(as_json.stdout)
    assert result["unchanged"] is True and result["pr_url"] is None and result["commit_oid"] == main_before

    text = run_cli(["push-to-hub", str(tiny_model_dir), "alice/same", "--create-pr"], env)
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    assert text.stdout.startswith(f"Nothing to push: {hub_server.url}/alice/same (main) already has these 3 files, "
                                  "so no pull request was opened\n")
    repo = hub_server.state.repos["alice/same"]
    assert repo.pulls == {} and repo.branches["main"] == main_before


def test_private_on_an_existing_public_repo_is_an_error(hub_server, tiny_model_dir, tmp_path):
    push_in_process(hub_server, tiny_model_dir, "alice/open")
    commits = len(hub_server.state.commits_received)
    other = make_tiny_model(tmp_path / "seed3", seed=3)
    proc = run_cli(["push-to-hub", str(other), "alice/open", "--private", "--revision", "dev"],
                   hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
    assert proc.returncode == 2
    assert_one_line_error(proc, "--private cannot apply", "alice/open already exists and is public")
    repo = hub_server.state.repos["alice/open"]
    assert repo.private is False and set(repo.branches) == {"main"}  # no branch created, nothing uploaded
    assert len(hub_server.state.commits_received) == commits

    # On a repo that is private already (or a new one), --private is what it says.
    push_in_process(hub_server, tiny_model_dir, "alice/closed", private=True)
    assert push_in_process(hub_server, other, "alice/closed", private=True).private is True

    from click.testing import CliRunner

    from stvit_cli.main import cli

    help_text = " ".join(CliRunner().invoke(cli, ["push-to-hub", "--help"]).output.split())
    assert "--private Create the repo as private; an error if it exists already and is public." in help_text


def test_unwritable_hf_home_is_one_line(hub_server, tiny_model_dir, tmp_path):
    """HF_HOME a regular file: one Error line, not huggingface_hub's "Ignored error while writing..." first."""
    push_in_process(hub_server, tiny_model_dir, "alice/nowhere")
    not_a_dir = tmp_path / "hf-home-file"
    not_a_dir.write_text("")
    env = {**hub_env(hub_server.url, tmp_path / "h"), "HF_HOME": str(not_a_dir)}  # no HF_TOKEN: no saved login
    proc = run_cli(["pull", "alice/nowhere"], env)
    error = assert_one_line_error(proc, "cannot write the Hugging Face cache", str(not_a_dir / "hub"), "HF_HOME")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [error]
    # --output does not need the cache (nor a saved login, for a public repo)
    into_dir = run_cli(["pull", "alice/nowhere", "--output", str(tmp_path / "out")], env)
    assert into_dir.returncode == 0, into_dir.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_pull_force_without_output_is_a_usage_error(hub_server, tiny_model_dir, tmp_path):
    """--force replaces --output; without --output it used to be ignored (exit 0)."""
    push_in_process(hub_server, tiny_model_dir, "alice/forced")
    requests_before = len(hub_server.state.requests)
    home = tmp_path / "home"
    proc = run_cli(["pull", "alice/forced", "--force"], hub_env(hub_server.url, home))
    assert proc.returncode == 2
    error = assert_one_line_error(proc, "--force applies to --output only")
    assert proc.stderr.strip().splitlines() == [error] and proc.stdout == ""
    assert len(hub_server.state.requests) == requests_before and not home.exists()


@pytest.mark.parametrize("args", [["alice/x@"], ["hf-hub:alice/x@"], ["alice/x", "--revision", ""],
                                  ["alice/x", "--revision", " "], ["alice/x@dev", "--revision", ""],
                                  ["alice/x@", "--output", "out"]])
def test_pull_an_empty_revision_is_a_usage_error_before_the_cache_or_the_hub(hub_server, tmp_path, args):
    """An empty revision used to reach huggingface_hub: 'cannot write .../refs/: Is a directory' (exit 1)."""
    home = tmp_path / "home"
    args = [str(tmp_path / a) if a == "out" else a for a in args]
    proc = run_cli(["pull", *args], hub_env(hub_server.url, home))
    assert proc.returncode == 2
    if "--revision" in args:  # an empty argument: the CLI refuses it before any command runs
        error = assert_one_line_error(proc, "the value of --revision is empty", "cannot be empty")
    else:  # the library's check of the spec
        error = assert_one_line_error(proc, "empty revision", "name a branch, tag, commit or refs/pr/N",
                                      "nothing after @")
    assert proc.stderr.strip().splitlines() == [error] and proc.stdout == ""
    assert hub_server.state.requests == [] and not home.exists() and not (tmp_path / "out").exists()


def test_push_to_an_empty_revision_is_a_usage_error(hub_server, tiny_model_dir, tmp_path):
    """--revision "" used to push to main unsaid."""
    proc = run_cli(["push-to-hub", str(tiny_model_dir), "alice/x", "--revision", ""],
                   hub_env(hub_server.url, tmp_path / "home", ALICE_TOKEN))
    assert proc.returncode == 2
    assert_one_line_error(proc, "the value of --revision is empty")
    assert hub_server.state.repos == {} and hub_server.state.requests == []


def test_the_library_refuses_an_empty_revision_too(tmp_path):
    """push_to_hub / pull_from_hub called from Python: the same check, before any request."""
    from stvit_core.errors import InvalidArgumentError
    from stvit_core.hub import pull_from_hub

    with pytest.raises(InvalidArgumentError, match=r"empty revision \(--revision ' '\)"):
        pull_from_hub("alice/x", revision=" ", endpoint="http://127.0.0.1:9")

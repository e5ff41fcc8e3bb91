"""``stvit push-to-hub`` and ``stvit pull``: share model directories on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ._checks import EarlyError, check_output_dir, invalid
from ._common import echo_json, json_option, quiet_option


def _quiet_hub(quiet: Optional[bool]) -> None:
    """``--quiet`` turns off huggingface_hub's progress bars and warnings (HF_HUB_DISABLE_PROGRESS_BARS also works)."""
    if not quiet:
        return
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


@click.command("push-to-hub")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True,
              help="Create the repo as private; an error if it exists already and is public.")
@click.option("--revision", metavar="BRANCH", show_default="main",
              help="Branch to push to; created from main if missing.")
@click.option("--commit-message", metavar="TEXT", show_default="Upload ARCH with stvit", help="Commit message.")
@click.option("--token", metavar="TOKEN", show_default="$HF_TOKEN, else the saved `hf auth login`",
              help="Hub token with write access.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@quiet_option
@json_option
def push_to_hub(model_dir: str, repo_id: str, private: bool, revision: Optional[str], commit_message: Optional[str],
                token: Optional[str], create_pr: bool, quiet: Optional[bool], as_json: bool) -> None:
    """Upload MODEL_DIR (config.json + model.safetensors) to the Hub repo REPO_ID with a model card.

    MODEL_DIR must hold a model that loads. The repo is created if needed. Besides the weights, README.md (a generated model card with params,
    GFLOPs, speedup, evaluation results and citation, unless MODEL_DIR has its own README.md) and any
    evaluation results / training config found in MODEL_DIR (results*.json, eval*.json, metrics.csv,
    args.yaml, ...) are uploaded in one commit. Pushing the same directory again is a no-op (with
    --create-pr: no pull request is opened).
    HF_ENDPOINT selects a self-hosted Hub.

    \b
    Examples:
      stvit push-to-hub stvit-deit-s me/stvit-deit-small
      stvit push-to-hub stvit-deit-s me/stvit-deit-small --revision tokens-36 --private
      stvit push-to-hub stvit-deit-s org/stvit-deit-small --create-pr --json
    """
    if not Path(model_dir).is_dir():  # before stvit_core (torch) is imported; as stvit_core.hub says it
        raise EarlyError(f"{Path(model_dir)} is not a directory")

    from stvit_core.hub import push_to_hub as push

    _quiet_hub(quiet)
    result = push(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                  token=token, create_pr=create_pr)
    if as_json:
        echo_json(result.to_dict())
        return
    where = result.pr_url or f"{result.url} ({result.revision})"
    if result.unchanged:
        no_pr = ", so no pull request was opened" if create_pr else ""
        click.echo(f"Nothing to push: {where} already has these {len(result.files)} files{no_pr}")
    else:
        click.echo(f"Pushed {len(result.files)} files to {where}")
    click.echo(f"commit {result.commit_oid}")
    click.echo(f"Load it with: timm.create_model('hf-hub:{result.repo_id}"
               f"{'' if result.revision == 'main' else '@' + result.revision}', pretrained=True)")


@click.command("pull")
@click.argument("repo_id")
@click.option("--revision", metavar="REV", show_default="main", help="Branch, tag, commit or refs/pr/N.")
@click.option("--output", "-o", "output", type=click.Path(path_type=str), metavar="DIR",
              show_default="the Hugging Face cache", help="Directory to download into.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--token", metavar="TOKEN", show_default="$HF_TOKEN, else the saved `hf auth login`",
              help="Hub token, for private repos.")
@quiet_option
@json_option
def pull(repo_id: str, revision: Optional[str], output: Optional[str], force: bool, token: Optional[str],
         quiet: Optional[bool], as_json: bool) -> None:
    """Download the model repo REPO_ID and check that it loads.

    REPO_ID may carry a revision as REPO_ID@REV. Without --output the files go to the Hugging Face
    cache (HF_HOME / HF_HUB_CACHE), where `timm.create_model('hf-hub:REPO_ID')` finds them. Offline
    (HF_HUB_OFFLINE=1) or with the Hub unreachable, the copy already in that cache is used.

    \b
    Examples:
      stvit pull me/stvit-deit-small
      stvit pull me/stvit-deit-small --revision tokens-36 --output stvit-deit-s-36
      stvit pull me/stvit-deit-small@tokens-36 --json
    """
    # plain arguments first, before stvit_core (torch) is imported: a wrong option or path fails at once
    if force and output is None:
        raise invalid("--force applies to --output only (the directory it replaces)")
    check_output_dir(output, force=force)

    from stvit_core.hub import pull_from_hub
    from stvit_core.hub_access import split_repo_spec

    repo_id, revision = split_repo_spec(repo_id, revision)
    _quiet_hub(quiet)
    result = pull_from_hub(repo_id, revision=revision, output_dir=output, token=token, force=force)
    if as_json:
        echo_json(result.to_dict())
        return
    commit = f" (commit {result.commit_oid[:12]})" if result.commit_oid else ""
    source = " from the local cache (offline)" if result.from_cache else ""
    click.echo(f"Pulled {result.repo_id}@{result.revision}{commit}{source} to {result.path}")
    click.echo(f"{result.architecture}: {result.num_params / 1e6:.2f}M parameters, loads OK")

"""``stvit push-to-hub`` and ``stvit pull``: share model directories on the Hugging Face Hub."""

from __future__ import annotations

import json

import click


def _quiet_hub(quiet: bool) -> None:
    """``--quiet`` turns off huggingface_hub's progress bars and warnings (HF_HUB_DISABLE_PROGRESS_BARS also works)."""
    if not quiet:
        return
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


@click.command("push-to-hub")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (only when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", help="Branch to push to; created from main if missing.")
@click.option("--commit-message", metavar="TEXT", help="Commit message (default: 'Upload ARCH with stvit').")
@click.option("--token", metavar="TOKEN", help="Hub token (default: $HF_TOKEN, else the saved `hf auth login`).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def push_to_hub(model_dir, repo_id, private, revision, commit_message, token, create_pr, quiet, as_json) -> None:
    """Upload MODEL_DIR (config.json + model.safetensors) to the Hub repo REPO_ID with a model card.

    The repo is created if needed. Besides the weights, README.md (a generated model card with params,
    GFLOPs, speedup, evaluation results and citation, unless MODEL_DIR has its own README.md) and any
    evaluation results / training config found in MODEL_DIR (results*.json, eval*.json, metrics.csv,
    args.yaml, ...) are uploaded in one commit. Pushing the same directory again is a no-op.
    HF_ENDPOINT selects a self-hosted Hub.

    \b
    Examples:
      stvit push-to-hub stvit-deit-s me/stvit-deit-small
      stvit push-to-hub stvit-deit-s me/stvit-deit-small --revision tokens-36 --private
      stvit push-to-hub stvit-deit-s org/stvit-deit-small --create-pr --json
    """
    from stvit_core.hub import push_to_hub as push

    _quiet_hub(quiet)
    result = push(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                  token=token, create_pr=create_pr)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    where = result.pr_url or f"{result.url} ({result.revision})"
    if result.unchanged:
        click.echo(f"Nothing to push: {where} already has these {len(result.files)} files")
    else:
        click.echo(f"Pushed {len(result.files)} files to {where}")
    click.echo(f"commit {result.commit_oid}")
    click.echo(f"Load it with: timm.create_model('hf-hub:{result.repo_id}"
               f"{'' if result.revision == 'main' else '@' + result.revision}', pretrained=True)")


@click.command("pull")
@click.argument("repo_id")
@click.option("--revision", metavar="REV", help="Branch, tag, commit or refs/pr/N (default: main).")
@click.option("--output", "-o", "output", type=click.Path(path_type=str),
              help="Directory to download into (default: the Hugging Face cache).")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--token", metavar="TOKEN", help="Hub token for private repos (default: $HF_TOKEN or saved login).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def pull(repo_id, revision, output, force, token, quiet, as_json) -> None:
    """Download the model repo REPO_ID and check that it loads.

    REPO_ID may carry a revision as REPO_ID@REV. Without --output the files go to the Hugging Face
    cache (HF_HOME / HF_HUB_CACHE), where `timm.create_model('hf-hub:REPO_ID')` finds them.

    \b
    Examples:
      stvit pull me/stvit-deit-small
      stvit pull me/stvit-deit-small --revision tokens-36 --output stvit-deit-s-36
      stvit pull me/stvit-deit-small@tokens-36 --json
    """
    from stvit_core.errors import InvalidArgumentError
    from stvit_core.hub import pull_from_hub

    if repo_id.startswith("hf-hub:"):
        repo_id = repo_id[len("hf-hub:"):]
    if "@" in repo_id:
        repo_id, _, at_rev = repo_id.partition("@")
        if revision and revision != at_rev:
            raise InvalidArgumentError(f"two revisions given: @{at_rev} and --revision {revision}")
        revision = at_rev
    _quiet_hub(quiet)
    result = pull_from_hub(repo_id, revision=revision, output_dir=output, token=token, force=force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    commit = f" (commit {result.commit_oid[:12]})" if result.commit_oid else ""
    click.echo(f"Pulled {result.repo_id}@{result.revision}{commit} to {result.path}")
    click.echo(f"{result.architecture}: {result.num_params / 1e6:.2f}M parameters, loads OK")

"""`fast-steer push` and `fast-steer pull`: publish SAE folders to the Hugging Face Hub and fetch them back."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument(
    "sae_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--repo", "repo_id", required=True, help="Hub model repo, owner/name (created if missing).")
@click.option(
    "--dry-run",
    "dry_run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the exact upload tree (SAE sub-folders + README.md) to this empty folder; upload nothing.",
)
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--message", "commit_message", default="Upload SAEs with fast-steer", show_default=True)
def push_command(
    sae_dirs: tuple[Path, ...], repo_id: str, dry_run_dir: Path | None, private: bool, commit_message: str
) -> None:
    """Upload SAE_DIRS as sub-folders of a Hub repo with a generated model card.

    The token comes from $HF_TOKEN or `hf auth login` and is never printed.
    """
    from hub.publish import push_saes

    result = push_saes(
        list(sae_dirs), repo_id, dry_run_dir=dry_run_dir, private=private, commit_message=commit_message
    )
    if result.tree is not None:
        click.echo(f"dry run: nothing uploaded; the tree for {repo_id} is in {result.tree}")
        for path in sorted(p for p in result.tree.rglob("*") if p.is_file()):
            click.echo(f"  {path.relative_to(result.tree).as_posix()}  ({path.stat().st_size:,} bytes)")
        return
    click.echo(f"pushed {len(result.sae_ids)} SAE(s) to {repo_id}: {', '.join(result.sae_ids)}")
    if result.url:
        click.echo(result.url)


@click.command("pull")
@click.argument("repo")
@click.option(
    "--sae-id",
    help="Sub-folder of the repo holding the SAE (e.g. 'FAST/blocks_8_hook_resid_post_8X_2048_jumprelu').",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also save the SAE here in the SAELens v6 layout (converts v5 / sparsify folders).",
)
@click.option("--dtype", default=None, help="Load as float32 | bfloat16 | float16 (default: as stored).")
def pull_command(repo: str, sae_id: str | None, out: Path | None, dtype: str | None) -> None:
    """Download (only the needed files), validate and describe one SAE of REPO (a Hub repo id or a local folder)."""
    from hub.publish import describe_sae, format_summary, pull_sae

    sae, source, written = pull_sae(repo, sae_id, out=out, dtype=dtype)
    click.echo(f"validated SAE in {source}")
    click.echo(format_summary(describe_sae(sae)))
    if written is not None:
        click.echo(f"saved (SAELens v6 layout) to {written}")


def register(group: click.Group) -> None:
    group.add_command(push_command)
    group.add_command(pull_command)

"""`fast-steer push`, `pull` and `convert`: publish SAE folders to the Hugging Face Hub, fetch them back
(also by SAELens release id), and convert pickle-only SAE files once, on request."""

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
@click.argument("sae_id_arg", metavar="[SAE_ID]", required=False)
@click.option(
    "--sae-id",
    help="Sub-folder of the repo holding the SAE (e.g. 'FAST/blocks_8_hook_resid_post_8X_2048_jumprelu'), "
    "or the SAE id of a SAELens release; same as the SAE_ID argument.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also save the SAE here in the SAELens v6 layout (converts v5 / sparsify / Gemma Scope / Llama Scope).",
)
@click.option("--dtype", default=None, help="Load as float32 | bfloat16 | float16 (default: as stored).")
@click.option(
    "--resolve-only",
    is_flag=True,
    help="Only print where the SAE is (Hub repo, path, format, Neuronpedia id); no download, no network.",
)
def pull_command(
    repo: str,
    sae_id_arg: str | None,
    sae_id: str | None,
    out: Path | None,
    dtype: str | None,
    resolve_only: bool,
) -> None:
    """Download (only the needed files), validate and describe one SAE.

    REPO is a Hub repo id (owner/name, SAE_ID its sub-folder), a local folder, or a SAELens release id
    (SAE_ID one of its SAEs), as in SAELens's `SAE.from_pretrained(release, sae_id)`; `RELEASE:SAE_ID`
    also works.
    """
    from hub.publish import describe_sae, format_summary, pull_sae
    from hub.sae_io import describe_reference

    if sae_id_arg and sae_id and sae_id_arg != sae_id:
        raise click.UsageError(f"SAE_ID {sae_id_arg!r} and --sae-id {sae_id!r} disagree; give one")
    sae_id = sae_id_arg or sae_id
    if resolve_only:
        for key, value in describe_reference(repo, sae_id).items():
            click.echo(f"{key}: {value}")
        return
    sae, source, written = pull_sae(repo, sae_id, out=out, dtype=dtype)
    click.echo(f"validated SAE in {source}")
    click.echo(format_summary(describe_sae(sae)))
    if written is not None:
        click.echo(f"saved (SAELens v6 layout) to {written}")


@click.command("convert")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New folder to write."
)
@click.option(
    "--sha256", "sha256", required=True, help="The file's expected SHA-256 (from the publisher or the Hub)."
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Required: accept that SRC is a pickle, loaded in a subprocess with torch.load(weights_only=True).",
)
def convert_command(src: Path, out: Path, sha256: str, allow_pickle: bool) -> None:
    """Convert a pickle-only SAE file (Goodfire .pth, dictionary_learning ae.pt, Qwen-Scope .sae.pt) to a
    SAELens v6 folder that then loads without pickle.

    The hash is checked and the pickle's opcodes are scanned against an allow-list before anything is
    unpickled; a config.json beside SRC (dictionary_learning, Qwen-Scope) is read for k, layer and model.
    """
    from hub.convert import convert_pickle

    written = convert_pickle(src, out, sha256, allow_pickle=allow_pickle)
    click.echo(f"converted {src} to {written} (SAELens v6: cfg.json + sae_weights.safetensors)")


def register(group: click.Group) -> None:
    group.add_command(push_command)
    group.add_command(pull_command)
    group.add_command(convert_command)

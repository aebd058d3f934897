"""``agrivlm recipe …``: build instruction data from a recipe, validate shards, preview records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

recipe_app = typer.Typer(
    name="recipe",
    help="Data recipes: rasters + parcels + labels → instruction records (JSONL) for the curriculum.",
    no_args_is_help=True,
)


def print_build_summary(manifest: dict[str, Any], out: Path, console: Console | None = None) -> None:
    """Records per family/task and split, chips per split, mixture proportions, phenology dates."""
    console = console or Console()
    splits = ("train", "val", "test")
    table = Table(title=f"recipe {manifest['recipe']} → {out}")
    table.add_column("family / task")
    for s in splits:
        table.add_column(s, justify="right")
    for key, counts in manifest["counts"]["by_task"].items():
        table.add_row(key, *(str(counts[s]) for s in splits))
    table.add_row("[bold]records[/bold]", *(f"[bold]{manifest['counts']['records'][s]}[/bold]" for s in splits))
    chips = manifest["chips"]
    table.add_row("chips", *(str(len(chips["by_split"][s])) for s in splits))
    console.print(table)
    st = manifest["stack"]
    where = (f"{st['sources']} sources, {st['n_dates']} dates in all" if "sources" in st
             else f"stack {st['n_dates']} dates")
    console.print(
        f"chips: {chips['kept']} kept of {chips['grid']} ({len(chips['excluded_buffer'])} excluded by the split "
        f"buffer); unique records {manifest['counts']['unique_records']}; {where} "
        f"{st['first_date'][:10]} → {st['last_date'][:10]}"
    )
    scenes = manifest.get("split", {}).get("scenes")
    if scenes:
        by_split: dict[str, list[str]] = {}
        for name, split in scenes.items():
            by_split.setdefault(split, []).append(name)
        console.print("sources per split: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(by_split.items())))
    if manifest.get("mixture"):
        mt = Table(title="mixture (achieved / requested)")
        mt.add_column("component")
        for s in splits:
            mt.add_column(s, justify="right")
        comps = list(dict.fromkeys(c for m in manifest["mixture"].values() for c in m["requested"]))
        for c in comps:
            cells = []
            for s in splits:
                m = manifest["mixture"].get(s)
                ok = m is not None and c in m["requested"]
                cells.append(f"{m['proportions'][c]:.3f} / {m['requested'][c]:.2f} (n={m['counts'][c]})" if ok else "-")
            mt.add_row(c, *cells)
        console.print(mt)
    ph = manifest["phenology"]
    pt = Table(title=f"phenology: {ph['fields_analysed']} fields analysed (median dates)")
    for col in ("season", "fields", "green-up (SOS)", "peak (POS)", "senescence", "EOS"):
        pt.add_column(col)
    for season, info in ph["seasons"].items():
        m = info["median"]
        pt.add_row(season, str(info["fields"]), m["sos"], m["pos"], m["senescence"], m["eos"])
    console.print(pt)
    console.print(f"tables: {out / 'tables'}   plots: {out / 'plots'}   manifest: {out / 'manifest.json'}")


@recipe_app.command("build")
def build(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (e.g. data_recipes/stage2.yaml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: shards/, manifest.json, tables/, plots/.")],
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Build a recipe: JSONL shards per split, a manifest, reference tables and plots; print a summary."""
    from agrivlm.recipes.build import build_recipe

    manifest = build_recipe(recipe, out, seed=seed, overwrite=overwrite, progress=progress)
    print_build_summary(manifest, out)


@recipe_app.command("validate")
def validate(
    shards: Annotated[list[Path], typer.Argument(help="JSONL shards (or folders of them) to validate.")],
) -> None:
    """Validate every record of the given shards; the first bad one is reported as FILE:LINE."""
    from agrivlm.recipes.schema import iter_records

    files: list[Path] = []
    for p in shards:
        files.extend(sorted(p.rglob("*.jsonl")) if p.is_dir() else [p])
    total = 0
    for f in files:
        n = sum(1 for _ in iter_records(f))
        total += n
        typer.echo(f"{f}: {n} records ok")
    typer.echo(f"{total} records in {len(files)} shard(s) are valid")


@recipe_app.command("show")
def show(
    shard: Annotated[Path, typer.Argument(help="A JSONL shard.")],
    n: Annotated[int, typer.Option(min=1, help="Records to show.")] = 3,
    task: Annotated[str | None, typer.Option(help="Only records of this task (e.g. green_up_date).")] = None,
) -> None:
    """Print records with positions rendered as readable numbers (u, v in [0, 1] of the chip; t of its frames)."""
    from agrivlm.recipes.schema import iter_records, plain_formatters, render_conversation

    shown = 0
    for rec in iter_records(shard):
        if task is not None and rec.task != task:
            continue
        typer.echo(f"# {rec.sample_id}  [{rec.family}/{rec.task}, {rec.split}, {len(rec.chip.frame_dates)} frames "
                   f"{rec.chip.frame_dates[0][:10]} → {rec.chip.frame_dates[-1][:10]}]")
        for role, text in render_conversation(rec, **plain_formatters()):
            typer.echo(f"  {role}: {text}")
        shown += 1
        if shown >= n:
            break

"""PNG pictures for `--plot` (matplotlib is an optional extra: `pip install 'recipekit[plot]'`)."""
from __future__ import annotations

from pathlib import Path

from recipekit.engine.errors import Problem, RecipekitError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RecipekitError(Problem("--plot needs matplotlib: pip install 'recipekit[plot]'")) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def heatmap(path: Path, values: list[list[float]], *, rows: list[str], columns: list[str], title: str,
            xlabel: str, ylabel: str, colorbar: str) -> None:
    """`values[r][c]` as a colour grid, rows top to bottom."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * len(columns) + 2), max(3.0, 0.3 * len(rows) + 1.5)))
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 16 else 0)
    axes.set_yticks(range(len(rows)), rows)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    figure.colorbar(image, ax=axes, label=colorbar)
    _save(plt, figure, path)


def curve(path: Path, xs: list[float], ys: list[float], *, title: str, xlabel: str, ylabel: str) -> None:
    """One value per x, as a line with markers."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(xs, ys, marker="o")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    _save(plt, figure, path)


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    try:
        # no timestamp or software version in the file: the same data gives the same bytes
        figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    except OSError as e:
        raise RecipekitError(Problem(f"cannot write the plot: {e.strerror}", str(path))) from None
    finally:
        plt.close(figure)

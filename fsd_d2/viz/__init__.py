"""PNG figures of searches, evaluations and the graph module (matplotlib ``Figure`` only, no pyplot state)."""
from pathlib import Path
from typing import Union

from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Union[str, Path], dpi: int = 100) -> Path:
    """Tight layout and a PNG at ``path`` (parent folders created); returns ``path`` as a Path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

"""matplotlib, an optional dependency (``pip install 'rela[plots]'``), imported only where a figure is drawn."""

from __future__ import annotations

from rela.errors import RelaError

INSTALL_HINT = "pip install 'rela[plots]'"


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or a RelaError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise RelaError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_plots() -> None:
    """Fail before any work when a command will end with a figure and matplotlib is missing."""
    pyplot()

"""``python -m flows`` runs the segflow command (as the console script does)."""

from flows.cli import app

app(prog_name="segflow")

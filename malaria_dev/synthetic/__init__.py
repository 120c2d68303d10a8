"""Synthetic thin-blood-smear cell crops that look like the NIH malaria cell images.

Tests, demos and end-to-end runs must work on a machine without the real data set, so
this package draws single red-blood-cell crops with the look and the file naming of the
NIH/NLM images: a pinkish cell on a black background, a stain style shared by all cells
of one slide, and purple ring forms or chromatin dots in parasitized cells. It also builds
a catalogue of bad uploads with the outcome the ingest validator must reach for each.

Everything is deterministic for a seed. Modules: ``stain`` (what a slide's cells share),
``drawing`` (one cell), ``cells`` (labelled cells, names, class-folder trees),
``bad_uploads`` (the bad-input catalogue). Class names come from ``malaria.core.labels``.
"""

from malaria_dev.synthetic.bad_uploads import BadInput, bad_inputs
from malaria_dev.synthetic.cells import (
    FIRST_SYNTHETIC_SLIDE,
    SyntheticCell,
    generate_cells,
    generate_scan_cells,
    write_labelled_tree,
)
from malaria_dev.synthetic.drawing import MAX_SIDE, MIN_SIDE, render_cell

__all__ = [
    "FIRST_SYNTHETIC_SLIDE",
    "MAX_SIDE",
    "MIN_SIDE",
    "BadInput",
    "SyntheticCell",
    "bad_inputs",
    "generate_cells",
    "generate_scan_cells",
    "render_cell",
    "write_labelled_tree",
]

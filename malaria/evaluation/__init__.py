"""How good a model is, computed on values (no I/O): :mod:`.metrics` (AUC, the metrics at a
threshold, calibration, parasitemia error), :mod:`.slides` (slide-level bootstrap intervals),
:mod:`.threshold` (the decision threshold, chosen on validation slides), :mod:`.plots` (PNG
pictures of an evaluation), :mod:`.drift` (tonight's scores against the validation slides')."""

"""Command-line data tools (``itune-data``): thin entry points over :mod:`itune.data`. No torch imports."""

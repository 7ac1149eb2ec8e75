"""The measurements: scripts that print tables and write CSV / PNG. Run each from the repository
root as a module, `python -m bench.NAME ...`, so that it imports the checkout's sst_dist and its
sibling modules (harness, size_recipe) with no path set by hand."""

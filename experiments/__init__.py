"""Scripts that reproduce the paper's figures; each prints a table and writes results/."""

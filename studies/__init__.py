"""The study runner of compare.py and ablation.py (study.py), the comparison's tables (tables.py) and its
figure (figures.py)."""

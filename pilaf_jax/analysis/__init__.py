"""Analysis of experiments: statistics over seeds (stats.py), study reports with tables and plots
(report.py), and the exact theory lab on enumerable tasks (theory.py)."""
